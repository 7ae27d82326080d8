"""Accuracy-budgeted search over token merging, pruning, layer skipping, sparsity and quantization; a CNN and an
MLP (trained on the digits here, no transformer blocks) get the sparsity and quantization knobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from digits_vit import accuracy

import nnforge
from nnforge.errors import NnforgeError
from nnforge.ir import interpret
from nnforge.models.digits import load_data
from nnforge.passes.budget import (
    Budget,
    Setting,
    build,
    cosine_quality,
    default_space,
    flop_time,
    flops,
    plot_pareto,
    quality_drop,
    search,
    top1_quality,
)

# a small search space keeps the suite quick; default_space is tested on its own
SPACE = dict(merge_r=[0, 4, 8], prune_keep=[1.0, 0.7], skip=[0, 1], quantize=["float"])


@pytest.fixture
def split(digits_vit):
    d = digits_vit
    # 200 and 297 digits, both unseen in training and kept apart from each other
    return d, d.calibration(), d.heldout()


def _outputs(graph, batches):
    return [interpret(graph, b)[0] for b in batches]


def test_cosine_budget_is_honoured_on_held_out_data(split):
    d, cal, held = split
    budget = Budget(metric="cosine", max_drop=0.01, **SPACE)
    res = search(d.graph, budget, cal, held, time_fn=flop_time(cal[0]))
    # merging 8 tokens per block (65 -> 17) costs ~0.1% cosine for 1.67x fewer FLOPs; skip 1 and keep 0.7 cost ~0.9%
    assert not res.setting.lossless and res.speedup > 1.5
    # re-measure independently on the held-out batches
    drop = quality_drop(cosine_quality, _outputs(res.graph, held), _outputs(d.graph, held))
    assert drop == pytest.approx(res.drop) and drop <= 0.01
    assert "held-out drop" in res.report() and str(res.setting) in res.report()
    measured = [c for c in res.candidates if c.evaluated]
    assert measured and all(c.heldout_drop is None or c.seconds is not None for c in res.candidates)


def test_accuracy_budget_with_a_callable_metric(split):
    d, cal, held = split
    labels = d.y_heldout

    def acc(outputs, reference):  # quality on real labels (the held-out batches, concatenated in order)
        return accuracy(outputs, labels) if len(outputs) == len(labels) else top1_quality(outputs, reference)

    res = search(d.graph, Budget(metric=acc, max_drop=0.01, **SPACE), cal, held, time_fn=flop_time(cal[0]))
    base = accuracy(np.concatenate(_outputs(d.graph, held)), labels)
    got = accuracy(np.concatenate(_outputs(res.graph, held)), labels)
    assert base - got <= 0.01 and res.speedup >= 1.0


def test_a_zero_budget_keeps_quality_exactly(split):
    d, cal, held = split
    res = search(d.graph, Budget(metric="top1", max_drop=0.0, **SPACE), cal, held, time_fn=flop_time(cal[0]))
    assert res.drop <= 0.0
    ref = np.concatenate(_outputs(d.graph, held)).argmax(-1)
    assert (np.concatenate(_outputs(res.graph, held)).argmax(-1) == ref).all()


def test_lossless_setting_and_flops_shrink(split):
    d, cal, _ = split
    assert Setting().lossless and Setting().passes() == []
    same = build(d.graph, Setting(), cal)
    np.testing.assert_array_equal(interpret(same, cal[0])[0], interpret(d.graph, cal[0])[0])
    base = flops(d.graph, cal[0])
    merged = flops(build(d.graph, Setting(merge_r=3), cal), cal[0])
    skipped = flops(build(d.graph, Setting(skip=1), cal), cal[0])
    assert merged < base and skipped < base
    assert Setting(3, 0.7, 1).dominates(Setting(2, 1.0, 0)) and not Setting(3, 1.0, 0).dominates(Setting(2, 0.7, 0))
    assert Setting(3, quant="w8a8").dominates(Setting(2, quant="int8")) and not Setting(3).dominates(
        Setting(2, quant="int8")
    )
    quantized = build(d.graph, Setting(quant="w8a8"), cal)
    assert {n.attrs["act_quant"] for n in quantized.nodes if n.op == "qlinear"} == {"dynamic"}
    assert flops(quantized, cal[0]) == base  # the same multiply-adds, in int8


def test_default_space_and_pareto_plot(split, tmp_path):
    d, cal, held = split
    space = default_space(d.graph, Budget(), cal[0])
    rs, keeps, skips = space.merge_r, space.prune_keep, space.skip
    # 64 patch tokens (the class token is kept) over 6 blocks: merging at most 3/4 of them, skipping up to half the blocks
    assert rs == [0, 2, 4, 6, 8] and max(rs) * 6 <= 64 * 3 // 4 and keeps[0] == 1.0 and skips == [0, 1, 2, 3]
    assert space.quantize == ["float", "int8", "w8a8"] and space.blocks == 6
    assert default_space(d.graph, Budget(), cal[0], "tvm").quantize == ["float", "w8a8"]
    assert space.sparsity == [0.0]  # with blocks, sparsity is searched only when asked for
    assert default_space(d.graph, Budget(sparsity=[0.5, 0]), cal[0]).sparsity == [0.0, 0.5]
    space = dict(merge_r=[0, 4], prune_keep=[1.0], skip=[0, 1], quantize=["float"])
    res = search(d.graph, Budget(max_drop=0.02, **space), cal, held, time_fn=flop_time(cal[0]), progress=True)
    path = tmp_path / "pareto.png"
    plot_pareto(res, path)
    assert path.stat().st_size > 1000


def test_budget_needs_both_data_sets(split):
    d, cal, _ = split
    with pytest.raises(NnforgeError, match="held-out"):
        search(d.graph, Budget(), cal, [])
    with pytest.raises(NnforgeError, match="metric must be"):
        search(d.graph, Budget(metric="bleu"), cal, cal)


QUANT_SPACE = dict(merge_r=[0, 2], prune_keep=[1.0], skip=[0], quantize=["float", "int8", "w8a8"])


def test_quantization_is_searched_on_onnxruntime_and_the_budget_holds(split):
    from nnforge.backends.base import get_backend
    from nnforge.passes.budget import wall_time

    d, cal, held = split
    ort = get_backend("onnxrt")
    res = search(
        d.graph,
        Budget(metric="cosine", max_drop=0.01, **QUANT_SPACE),
        cal,
        held,
        time_fn=wall_time(lambda g: ort.build(g, "cpu", {"threads": 1}).run, cal[0], repeat=3),
    )
    timed = {c.setting.quant for c in res.candidates if c.seconds is not None}
    assert {"int8", "w8a8"} & timed  # quantized graphs were built and timed by the backend
    drop = quality_drop(cosine_quality, _outputs(res.graph, held), _outputs(d.graph, held))
    assert drop == pytest.approx(res.drop) and drop <= 0.01
    assert str(res.setting) in res.report()


def test_a_faster_quantization_is_chosen_and_an_unavailable_one_left_out(split):
    d, cal, held = split
    flop = flop_time(cal[0])

    def time_fn(g):  # a backend whose int8 matmuls run twice as fast and that cannot build w8a8
        if any(n.attrs.get("act_quant") == "dynamic" for n in g.nodes if n.op == "qlinear"):
            raise NnforgeError("qlinear: no dynamic activations here")
        return flop(g) * (0.5 if any(n.op == "qlinear" for n in g.nodes) else 1.0)

    res = search(
        d.graph,
        Budget(
            metric="cosine", max_drop=0.01, merge_r=[0], prune_keep=[1.0], skip=[0], quantize=["float", "int8", "w8a8"]
        ),
        cal,
        held,
        time_fn=time_fn,
    )
    assert res.setting == Setting(quant="int8") and str(res.setting) == "int8" and res.speedup == pytest.approx(2.0)
    assert any(n.op == "qlinear" for n in res.graph.nodes) and 0 < res.drop <= 0.01
    (w8a8,) = [c for c in res.candidates if c.setting.quant == "w8a8"]
    assert w8a8.seconds is None and "no dynamic activations" in w8a8.error
    res = search(
        d.graph,
        Budget(metric="cosine", max_drop=0.0, merge_r=[0], prune_keep=[1.0], skip=[0], quantize=["float", "int8"]),
        cal,
        held,
        time_fn=time_fn,
    )
    assert res.setting.lossless  # int8 costs some quality: a zero budget keeps float


# ---------------------------------------------------------------------------------------
# models without transformer blocks: a CNN and an MLP trained on the digits (8x8 images)
# ---------------------------------------------------------------------------------------


class DigitsMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)


class DigitsCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 4 * 4, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.net(x)


def _train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 300) -> torch.nn.Module:
    """Adam on batches of 64, one thread (the same model on every machine, and no fight for a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_small():
    """(x_test, y_test, {"mlp": model, "cnn": model}): both trained on the 1300 training digits at 8x8."""
    x_train, y_train, x_test, y_test = load_data(img=8)
    models = {"mlp": _train(DigitsMLP(), x_train, y_train), "cnn": _train(DigitsCNN(), x_train, y_train)}
    return x_test, y_test, models


BATCH = torch.export.Dim("batch", min=1, max=1024)


def _torch_batches(x: np.ndarray, size: int = 100) -> list[tuple[torch.Tensor]]:
    return [(torch.from_numpy(x[i : i + size]),) for i in range(0, len(x), size)]


@pytest.mark.parametrize("family", ["cnn", "mlp"])
def test_compile_with_a_budget_searches_quantization_and_sparsity_for_a_model_without_blocks(family, digits_small):
    x_test, y_test, models = digits_small
    model = models[family]
    cal, held = _torch_batches(x_test[:200]), _torch_batches(x_test[200:])
    with torch.no_grad():
        base = accuracy(model(torch.from_numpy(x_test[200:])).numpy(), y_test[200:])
    assert base > 0.9  # a real, trained model
    fast = nnforge.compile(
        model,
        (torch.from_numpy(x_test[:4]),),
        dynamic_shapes=({0: BATCH},),
        budget=nnforge.Budget(metric="top1", max_drop=0.02),
        calibration=cal,
        heldout=held,
        progress=False,
    )
    note = fast.notes[0]
    assert "chosen:" in note and "within budget" in note, note
    searched = note.split("searched: ")[1]
    assert "sparsity 0, 0.5, 0.8, 0.9" in searched and "quantize float, int8, w8a8" in searched
    assert "no transformer blocks" in searched and "merge" not in searched
    # the held-out digits, re-measured on the compiled model: its top-1 agreement with the original's
    got = np.concatenate([fast(*b).numpy() for b in held])
    with torch.no_grad():
        want = np.concatenate([model(*b).numpy() for b in held])
    assert 1.0 - top1_quality(got, want) <= 0.02
    assert base - accuracy(got, y_test[200:]) <= 0.03  # and against the labels


def test_sparsity_is_chosen_where_it_saves_work_and_the_budget_holds(digits_small):
    """Counted in FLOPs, a CSR linear costs its stored weights: the strongest sparsity within budget wins."""
    x_test, y_test, models = digits_small
    graph = nnforge.import_model(models["mlp"], (torch.from_numpy(x_test[:4]),), dynamic_shapes=({0: BATCH},))
    cal = [[x_test[i : i + 100]] for i in (0, 100)]
    held = [[x_test[i : i + 100]] for i in range(200, len(x_test), 100)]
    budget = Budget(metric="top1", max_drop=0.05, quantize=["float"])
    res = search(graph, budget, cal, held, time_fn=flop_time(cal[0]))
    assert res.setting.sparsity > 0 and not res.setting.merge_r and res.speedup > 1.5, res.report()
    assert any(n.op == "sparse_linear" for n in res.graph.nodes)
    drop = quality_drop(top1_quality, _outputs(res.graph, held), _outputs(graph, held))
    assert drop == pytest.approx(res.drop) and drop <= 0.05
    assert f"chosen: sparsity {res.setting.sparsity:g}" in res.report()
    stronger = [c for c in res.candidates if c.setting.sparsity > res.setting.sparsity]
    assert all(c.drop is None or c.drop > budget.margin * budget.max_drop or c.heldout_drop > 0.05 for c in stronger)


def test_token_and_layer_knobs_on_a_model_without_blocks_are_refused_by_name(digits_small):
    x_test, _, models = digits_small
    graph = nnforge.import_model(models["cnn"], (torch.from_numpy(x_test[:4]),))
    cal = [[x_test[:4]]]
    with pytest.raises(NnforgeError, match=r"budget: merge_r, skip act on transformer blocks.*none"):
        default_space(graph, Budget(merge_r=[0, 2], skip=[1]), cal[0])
    space = default_space(graph, Budget(merge_r=[0], prune_keep=[1.0]), cal[0], "tvm")  # the lossless values are fine
    assert space.blocks == 0 and space.sparsity == [0.0, 0.8, 0.9] and space.quantize == ["float", "w8a8"]
    with pytest.raises(NnforgeError, match=r"sparsity must list fractions in \[0, 1\)"):
        default_space(graph, Budget(sparsity=[1.0]), cal[0])
