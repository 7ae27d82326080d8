"""ToMe for diffusion (nnforge.diffusion.tome, the grid_merge op of nnforge/ops/merge.py): the op against its
reference on every backend, the rewrite of a UNet2DConditionModel and a DiT compiled on ONNX Runtime and TVM
against the interpreter on the same merged graph, its quality on the trained digits model, and the budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge
from nnforge.api import import_model
from nnforge.backends.torch_exec import run_graph_torch
from nnforge.diffusion import DeepCache, DiffusionToMe, compile_denoiser, merge_self_attention, sample
from nnforge.diffusion.compile import denoiser_step
from nnforge.diffusion.metrics import psnr
from nnforge.ir import Graph, TensorType, interpret
from nnforge.ir.registry import OpError
from nnforge.models.real import dit_tiny, ensure_torchvision, unet2d_tiny
from nnforge.ops.merge import partition
from nnforge.passes.manager import PassManager

ensure_torchvision()


def merge_graph(shape, r, grid, stride=(2, 2)):
    """x -> grid_merge -> (merged, slot, unmerged: the gather that undoes it)."""
    g = Graph("merge")
    x = g.add_input("x", TensorType(shape, "float32"))
    merged, slot = g.add_node("grid_merge", [x], {"r": r, "grid": list(grid), "stride": list(stride)}).outputs
    idx = g.op("expand", g.op("unsqueeze", slot, axes=[-1]), shape=[-1, -1, shape[2]])
    g.outputs = [merged, slot, g.op("gather_elements", merged, idx, axis=1)]
    return g


@pytest.mark.parametrize("backend", ["torch", "onnxrt", "tvm"])
def test_grid_merge_matches_its_reference(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6 * 8, 5)).astype(np.float32)
    g = merge_graph(x.shape, 20, (6, 8))
    ref = interpret(g, [x])
    if backend == "torch":
        got = run_graph_torch(g, [x])
    else:
        got = nnforge.compile(g, [x], "cpu", backend=backend, cache=False).run([x])
    np.testing.assert_array_equal(got[1], ref[1])
    for a, b in (got[0], ref[0]), (got[2], ref[2]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_merged_tokens_are_means_and_unmerge_restores_the_grid():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7 * 6, 4)).astype(np.float32)  # odd rows: the last cells are cut short
    merged, slot, unmerged = interpret(merge_graph(x.shape, 15, (7, 6)), [x])
    src, dst = partition(7, 6, 2, 2)
    assert len(dst) == 4 * 3 and merged.shape == (2, 42 - 15, 4) and unmerged.shape == x.shape
    for b in range(2):
        assert sorted(set(slot[b])) == list(range(27))  # every merged token stands for some tokens
        for s in range(27):
            np.testing.assert_allclose(merged[b, s], x[b, slot[b] == s].mean(0), atol=1e-6)
        assert len(set(slot[b, dst])) == len(dst)  # destinations never merge with each other
        assert (np.bincount(slot[b]) > 1).sum() <= 15
        np.testing.assert_array_equal(unmerged[b], merged[b, slot[b]])
    # r = 0: a permutation, undone exactly
    merged, slot, unmerged = interpret(merge_graph(x.shape, 0, (7, 6)), [x])
    np.testing.assert_array_equal(unmerged, x)
    with pytest.raises(OpError, match=r"r=31 must be in \[0, 30\]"):
        merge_graph(x.shape, 31, (7, 6))


def graph_of(model, *inputs, conditioning=()):
    with torch.no_grad():
        return import_model(denoiser_step(model, list(conditioning)), inputs)


def unet_case():
    """The zoo's tiny UNet2DConditionModel on 32x32 latents: self-attention on 1024 tokens at the finest level."""
    from nnforge.models import real

    step, (_, t, text) = real.unet2d_condition("tiny")
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = graph_of(step.unet, x, t.expand(1), text, conditioning=["encoder_hidden_states"])
    return graph, [x.numpy(), t.expand(1).numpy(), text.numpy()]


def dit_case():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([40, 40]), torch.tensor([1, 7])
    return graph_of(dit_tiny(num_layers=2, sample_size=16), x, t, y, conditioning=["class_labels"]), [
        x.numpy(),
        t.numpy(),
        y.numpy(),
    ]


@pytest.mark.parametrize("case", ["unet2d_condition", "dit"])
def test_merged_denoiser_compiles_losslessly(case):
    graph, feeds = unet_case() if case == "unet2d_condition" else dit_case()
    merged = DiffusionToMe(ratio=0.5).rewrite(graph)
    stats = merge_self_attention(graph.copy(), DiffusionToMe(ratio=0.5))
    if case == "unet2d_condition":  # the down block's and the last up block's two (32x32); not the mid block's
        assert [(n, r) for _, n, r in stats.merged] == [(1024, 512)] * 3
        coarser = merge_self_attention(graph.copy(), DiffusionToMe(ratio=0.5, max_downsample=2))
        assert sorted(n for _, n, _ in coarser.merged) == [256, 1024, 1024, 1024]  # and the mid block's (16x16)
    else:  # both DiT blocks: 8x8 patches
        assert [(n, r) for _, n, r in stats.merged] == [(64, 32)] * 2
    assert merged.op_counts()["grid_merge"] == len(stats.merged)
    reference = interpret(merged, feeds)[0]
    for backend in ("onnxrt", "tvm"):
        got = nnforge.compile(merged, feeds, "cpu", backend=backend, cache=False).run(feeds)[0]
        np.testing.assert_allclose(got, reference, atol=2e-4, rtol=1e-3, err_msg=backend)
    unmerged = interpret(graph, feeds)[0]
    diff = np.abs(reference - unmerged).max()
    assert 1e-4 < diff < 0.5 * np.abs(unmerged).max()  # lossy, but close
    assert DiffusionToMe(ratio=0).rewrite(graph) is graph
    # the same rewrite as a lossy pass in a pipeline
    manager = PassManager([DiffusionToMe(ratio=0.5).make_pass()])
    assert manager.run(graph.copy()).op_counts()["grid_merge"] == len(stats.merged)
    assert manager.records[0].lossy and manager.records[0].changed


def test_tome_on_the_digits_model_and_with_deepcache(digits_diffusion):
    """The trained digits U-Net: self-attention at 4x4 (16 tokens), 4 of 8 merged. 50 DDIM steps, 50 samples."""
    m = digits_diffusion
    labels = torch.arange(50) % 10
    noise = torch.randn(50, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    run = lambda cache: sample(  # noqa: E731
        compile_denoiser(m.unet, noise, 999, cache=cache, class_labels=labels),
        m.scheduler("ddim"),
        noise,
        50,
        class_labels=labels,
    )
    reference = run(None)
    base = m.agreement(reference, labels)
    merged = run(DiffusionToMe(ratio=0.5))
    both = compile_denoiser(m.unet, noise, 999, cache=[DeepCache(interval=3), DiffusionToMe(0.5)], class_labels=labels)
    assert both.method == "DeepCache(N=3, branch=0) + ToMe(ratio=0.5)"
    combined = sample(both, m.scheduler("ddim"), noise, 50, class_labels=labels)
    assert (both.full_calls, both.cached_calls) == (17, 33)
    assert 25 < psnr(merged, reference) < 80
    assert 20 < psnr(combined, reference) < psnr(merged, reference)
    assert m.agreement(merged, labels) >= base - 0.04
    assert m.agreement(combined, labels) >= base - 0.06


def test_budget_tries_merge_ratios_where_the_attention_is_big_enough(digits_diffusion):
    from nnforge.diffusion import Combined
    from nnforge.diffusion.budget import default_candidates

    graph, _ = unet_case()
    tome = [c for c in default_candidates(graph) if "ToMe" in c.name]
    assert tome == [
        DiffusionToMe(0.3),
        DiffusionToMe(0.5),
        DiffusionToMe(0.7),
        Combined((DeepCache(interval=3), DiffusionToMe(0.5))),
    ]
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), torch.tensor([1, 2])
    notes = []
    digits = default_candidates(graph_of(digits_diffusion.unet, x, t, y, conditioning=["class_labels"]), notes)
    assert not any("ToMe" in c.name for c in digits)
    assert notes == [
        "ToMe not tried: the largest self-attention has 16 tokens (fewer than 64: merging saves next to nothing)"
    ]


def test_budget_picks_the_largest_merge_ratio_within_a_psnr_floor(digits_diffusion):
    """Measured on this noise (20 DDIM steps, 30 samples): ratio 0.3 / 0.5 / 0.7 keep 44.0 / 41.1 / 39.0 dB against
    the uncached samples; a 42.5 dB floor admits 0.3 only, though 0.7 is the cheapest."""
    from nnforge.diffusion.budget import search_cache

    m = digits_diffusion
    labels = torch.arange(30) % 10
    noise = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    choice = search_cache(
        m.unet,
        noise,
        m.scheduler("ddim"),
        nnforge.Budget(metric="agreement", max_drop=0.05),
        steps=20,
        candidates=[DiffusionToMe(0.3), DiffusionToMe(0.5), DiffusionToMe(0.7)],
        classify=m.classify,
        min_psnr=42.5,
        timing="flops",
        class_labels=labels,
    )
    assert [t.name for t in choice.trials] == ["ToMe(ratio=0.7)", "ToMe(ratio=0.5)", "ToMe(ratio=0.3)"]  # by MACs
    assert [t.within for t in choice.trials] == [False, False, True]
    assert all(t.agreement >= choice.reference.agreement - 0.05 for t in choice.trials)
    assert choice.setting == DiffusionToMe(0.3) and choice.heldout.psnr > 42.5


def test_bad_settings_and_graphs_without_self_attention_are_named():
    with pytest.raises(nnforge.NnforgeError, match=r"ratio must be in \[0, 1\)"):
        DiffusionToMe(ratio=1.0)
    with pytest.raises(nnforge.NnforgeError, match="stride and max_downsample must be >= 1"):
        DiffusionToMe(stride=0)
    plain = unet2d_tiny(add_attention=False)  # no mid-block attention either
    with pytest.raises(nnforge.NnforgeError, match="found no self-attention"):
        DiffusionToMe(0.5).rewrite(graph_of(plain, torch.randn(1, 3, 8, 8), torch.tensor([3])))
