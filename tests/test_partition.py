"""Opaque torch ops, partitioning with torch fallback, partitioned bundles, the torch executor."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from fuzz.strategies import graphs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnforge
from nnforge import BundleError, UnsupportedOpError
from nnforge.backends.torch_exec import run_graph_torch
from nnforge.frontend.torch import import_torch
from nnforge.ir import Graph, TensorType, interpret, verify
from nnforge.ir.serialize import graph_from_json, graph_to_json
from nnforge.models import zoo
from nnforge.partition import group_nodes, plan_partitions


@torch.library.custom_op("nnforge_test::twice_plus", mutates_args=())
def twice_plus(x: torch.Tensor, k: float) -> torch.Tensor:
    return x * 2 + k


@twice_plus.register_fake
def _(x, k):
    return torch.empty_like(x)


class Rare(torch.nn.Module):
    """An MLP with a rare ATen op (logcumsumexp) and a custom op between supported layers."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.l2(torch.nn.functional.gelu(self.l1(x))))
        h = torch.logcumsumexp(torch.tanh(h * 0.5), dim=-1)
        h = torch.ops.nnforge_test.twice_plus(h, 0.5)
        return torch.sigmoid(self.l3(torch.tanh(h) * 2.0)) + 1.0


_THREADS_SEEN: list[int] = []


@torch.library.custom_op("nnforge_test::note_threads", mutates_args=())
def note_threads(x: torch.Tensor) -> torch.Tensor:
    _THREADS_SEEN.append(torch.get_num_threads())
    return x.clone()


@note_threads.register_fake
def _(x):
    return torch.empty_like(x)


class NotesThreads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.l2(torch.ops.nnforge_test.note_threads(torch.relu(self.l1(x))))


class MultiOut(torch.nn.Module):
    def forward(self, x):
        values, idx = torch.cummax(x, dim=-1)
        return values * 2, idx, torch.flip(x, [0]), x.new_zeros(x.shape[0], 3)


BATCH = torch.export.Dim("batch", min=1, max=64)


def _eager(model, *xs):
    with torch.no_grad():
        out = model(*xs)
    return out if isinstance(out, tuple) else (out,)


def _close(got, want, tol=1e-5):
    got = got if isinstance(got, (tuple, list)) else (got,)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# the frontend keeps what it cannot map
# ---------------------------------------------------------------------------------------


def test_unmapped_ops_become_torch_op_nodes_that_the_interpreter_runs():
    x = torch.randn(3, 5)
    g = import_torch(MultiOut(), (x,), dynamic_shapes=({0: BATCH},))
    verify(g)
    targets = sorted(n.attrs["target"] for n in g.nodes if n.op == "torch_op")
    assert targets == ["aten.cummax.default", "aten.flip.default", "aten.full.default"]
    assert "aten.cummax.default(%0, -1)" in str(g)  # printed as the call it stands for
    x2 = torch.randn(6, 5)  # another batch: the symbolic size in new_zeros is bound per call
    _close(interpret(g, [x2.numpy()]), [t.numpy() for t in _eager(MultiOut(), x2)])
    _close(run_graph_torch(g, [x2.numpy()]), [t.numpy() for t in _eager(MultiOut(), x2)])


def test_torch_op_graphs_serialize_as_plain_json():
    g = import_torch(Rare(), (torch.randn(2, 8),))
    doc = json.loads(json.dumps(graph_to_json(g)))
    again = graph_from_json(doc, dict(g.constants))
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    _close(interpret(again, [x]), interpret(g, [x]))


def test_without_opaque_the_frontend_still_lists_every_unmapped_op():
    with pytest.raises(UnsupportedOpError) as e:
        import_torch(Rare(), (torch.randn(2, 8),), opaque=False)
    names = [op for op, _ in e.value.items]
    assert names == ["aten.logcumsumexp.default", "nnforge_test.twice_plus.default"]


# ---------------------------------------------------------------------------------------
# compile: partitions, min_block_size, fallback=False
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rare_compiled():
    model = Rare().eval()
    return model, nnforge.compile(model, (torch.randn(4, 8),), dynamic_shapes=({0: BATCH},), progress=False)


def test_compile_falls_back_to_torch_for_what_onnxrt_lacks(rare_compiled):
    model, fast = rare_compiled
    assert fast.backend == "onnxrt+torch"
    plan = fast.artifact.plan
    kinds = [p.backend for p in plan.partitions]
    assert kinds == ["onnxrt", "torch", "onnxrt"], str(plan)
    fallback = [fast.graph.nodes[k] for k in plan.fallback_nodes]
    assert sorted(n.attrs["target"] for n in fallback) == [
        "aten.logcumsumexp.default",
        "nnforge_test.twice_plus.default",
    ]
    assert all(len(p.nodes) >= plan.min_block_size for p in plan.partitions if p.backend == "onnxrt")
    x = torch.randn(7, 8)  # another batch size
    _close(fast(x).numpy(), [t.numpy() for t in _eager(model, x)])
    assert fast.accuracy["max_rel_error"] <= 1e-5


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_torch_partitions_take_one_thread_and_give_it_back(backend):
    """Between ONNX Runtime or TVM partitions, torch runs on one thread (its OpenMP workers would spin and take
    the cores from the next partition: bench/fallback_cost.py); the caller's thread count is restored."""
    model, x = NotesThreads().eval(), torch.randn(4, 8)
    fast = nnforge.compile(model, (x,), backend=backend, cache=False, progress=False, min_block_size=1)
    assert {p.backend for p in fast.artifact.plan.partitions} >= {backend, "torch"}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = _eager(model, x)
        _THREADS_SEEN.clear()
        _close(fast(x), want)
        assert _THREADS_SEEN == [1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_small_backend_partitions_stay_on_torch():
    model = Rare().eval()
    x = torch.randn(4, 8)
    fast = nnforge.compile(model, (x,), min_block_size=100, progress=False)
    assert [p.backend for p in fast.artifact.plan.partitions] == ["torch"]
    assert "below min_block_size 100" in " ".join(fast.artifact.plan.reasons.values())
    _close(fast(x).numpy(), [t.numpy() for t in _eager(model, x)])


def test_fallback_false_refuses_with_the_source_lines():
    lines, first = inspect.getsourcelines(Rare.forward)
    line = first + next(i for i, s in enumerate(lines) if "logcumsumexp" in s)
    with pytest.raises(UnsupportedOpError) as e:
        nnforge.compile(Rare(), (torch.randn(2, 8),), fallback=False, progress=False)
    assert "aten.logcumsumexp.default" in str(e.value) and f"test_partition.py:{line} in forward" in str(e.value)


def test_fallback_needs_a_host_target():
    with pytest.raises(UnsupportedOpError, match="host target"):
        nnforge.compile(Rare(), (torch.randn(2, 8),), target="arm", progress=False, check=False)


def test_a_model_the_backend_fully_takes_is_not_partitioned():
    zm = zoo.build("mlp", "tiny")
    fast = nnforge.compile(zm.model, zm.inputs, progress=False)
    assert fast.backend == "onnxrt" and not hasattr(fast.artifact, "plan")


def test_onnx_model_with_an_op_onnxrt_cannot_lower_falls_back():
    """adaptive pooling with uneven windows has no ONNX lowering: it runs on torch, the rest on ORT."""
    g = Graph("uneven")
    x = g.add_input("x", TensorType((1, 2, 5, 5)))
    w = g.add_constant(np.random.default_rng(0).standard_normal((2, 2, 1, 1)).astype(np.float32), "w")
    y = g.op("relu", g.op("conv2d", g.op("sigmoid", x), w))
    y = g.op("adaptive_avg_pool2d", g.op("tanh", y), output_size=[3, 3])
    g.outputs = [g.op("exp", g.op("neg", g.op("abs", y)))]
    xs = [np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)]
    fast = nnforge.compile(g, xs, progress=False)
    assert [p.backend for p in fast.artifact.plan.partitions] == ["onnxrt", "torch", "onnxrt"]
    _close(fast.run(xs), interpret(g, xs))


# ---------------------------------------------------------------------------------------
# the grouping: maximal, and never a cycle between partitions
# ---------------------------------------------------------------------------------------


def test_grouping_never_closes_a_cycle():
    """a -> f -> c and a -> c: putting a and c together would make {a, c} -> f -> {a, c}."""
    g = Graph("diamond")
    x = g.add_input("x", TensorType((2, 3)))
    a = g.op("relu", x)
    f = g.op(
        "torch_op",
        a,
        target="aten.logcumsumexp.default",
        args=[{"$t": 0}, 1],
        kwargs={},
        out_types=[{"shape": [2, 3], "dtype": "float32"}],
    )
    g.outputs = [g.op("add", a, f)]
    groups = group_nodes(g, [n.op != "torch_op" for n in g.nodes])
    assert [(on, idx) for on, idx in groups] == [(True, [0]), (False, [1]), (True, [2])]


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(case=graphs(), labels=st.lists(st.booleans(), min_size=40, max_size=40))
def test_grouping_is_a_valid_schedule_for_any_labelling(case, labels):
    g = case.graph
    groups = group_nodes(g, labels[: len(g.nodes)])
    assert sorted(k for _, idx in groups for k in idx) == list(range(len(g.nodes)))
    assert all(all(labels[k] == on for k in idx) for on, idx in groups)
    done = set(g.inputs) | set(g.const_values.values())
    for _, idx in groups:  # run groups in order: each reads only what earlier ones made, or itself
        mine = {o for k in idx for o in g.nodes[k].outputs}
        for k in idx:
            assert all(i is None or i in done or i in mine for i in g.nodes[k].inputs)
        done |= mine


def test_plan_reads_symbols_from_graph_inputs_when_a_partition_lacks_them():
    """A partition whose own inputs do not carry the batch symbol gets the graph input that does."""
    g = Graph("syms")
    x = g.add_input("x", TensorType(("batch", 4)))
    r = g.op("reshape", g.op("relu", x), shape=["batch", 2, 2])
    f = g.add_node(
        "torch_op",
        [r],
        dict(
            target="aten.logcumsumexp.default",
            args=[{"$t": 0}, 2],
            kwargs={},
            out_types=[{"shape": ["batch", 2, 2], "dtype": "float32"}],
        ),
    ).output
    out = g.op("reshape", g.op("exp", g.op("neg", g.op("abs", f))), shape=["batch", 4])
    g.outputs = [g.op("sigmoid", out)]
    plan = plan_partitions(g, "onnxrt", "cpu", min_block_size=1)
    assert [p.backend for p in plan.partitions] == ["onnxrt", "torch", "onnxrt"]
    xs = [np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)]
    fast = nnforge.compile(g, xs, progress=False, min_block_size=1)
    _close(fast.run(xs), interpret(g, xs))


# ---------------------------------------------------------------------------------------
# bundles record the plan; loaded bundles run it
# ---------------------------------------------------------------------------------------


def _rehash(d):
    from nnforge.bundle import _manifest_hash, _sha256

    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {name: _sha256(d / name) for name in m["files"]}
    m["hash"] = _manifest_hash(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_partitioned_bundle_round_trip(rare_compiled, tmp_path):
    model, fast = rare_compiled
    fast.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["backend"] == "onnxrt+torch" and "torch" in manifest["versions"]
    parts = manifest["partitions"]["partitions"]
    assert [p["backend"] for p in parts] == ["onnxrt", "torch", "onnxrt"]
    assert {"p0_model.onnx", "p2_model.onnx"} <= set(manifest["files"])
    again = nnforge.load(tmp_path / "b")
    assert again.artifact.plan.to_json() == fast.artifact.plan.to_json()
    x = torch.randn(3, 8)
    assert torch.equal(again(x), fast(x))

    # the plan is covered by the manifest hash
    shutil.copytree(tmp_path / "b", tmp_path / "t")
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    m["partitions"]["partitions"][0]["backend"] = "torch"
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json was modified"):
        nnforge.load(tmp_path / "t")

    # a plan edited with the hashes recomputed is still checked against the graph
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["partitions"]["partitions"][1]["nodes"] = []
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    _rehash(tmp_path / "c")
    with pytest.raises(BundleError, match="every node exactly once"):
        nnforge.load(tmp_path / "c")


@pytest.mark.parametrize("target", ["os.system.default", "builtins.eval.default", "aten.add_.Tensor", "not a name"])
def test_a_bundle_cannot_name_arbitrary_code(rare_compiled, tmp_path, target):
    """A rewritten torch_op (hashes recomputed) is refused by name; nothing but a torch op is ever looked up."""
    _, fast = rare_compiled
    fast.save(tmp_path / "b")
    doc = json.loads((tmp_path / "b" / "graph.json").read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "torch_op")
    node["attrs"]["target"] = target
    (tmp_path / "b" / "graph.json").write_text(json.dumps(doc))
    _rehash(tmp_path / "b")
    with pytest.raises(BundleError, match="not registered|mutates|not a qualified op name"):
        nnforge.load(tmp_path / "b")


def test_tvm_partitions_with_torch_fallback(tmp_path):
    model = Rare().eval()
    fast = nnforge.compile(model, (torch.randn(4, 8),), backend="tvm", progress=False)
    assert fast.backend == "tvm+torch"
    fast.save(tmp_path / "b")
    again = nnforge.load(tmp_path / "b")
    x = torch.randn(4, 8)
    _close(again(x).numpy(), [t.numpy() for t in _eager(model, x)], tol=1e-4)


class ViTWithRareHead(torch.nn.Module):
    """The tiny ViT with a custom op on its logits: the op becomes a torch_op node no backend takes."""

    def __init__(self):
        super().__init__()
        self.vit = zoo.build("vit", "tiny").model

    def forward(self, x):
        return torch.ops.nnforge_test.twice_plus(self.vit(x), 0.5)


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_budget_search_builds_its_candidates_through_the_partition_plan(backend, monkeypatch):
    from nnforge import partition

    built = []
    real_build = partition.build

    def counting_build(graph, settings):
        built.append(real_build(graph, settings))
        return built[-1]

    monkeypatch.setattr(partition, "build", counting_build)
    model = ViTWithRareHead().eval()
    x = torch.randn(2, 3, 32, 32)
    cal = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    budget = nnforge.Budget(max_drop=0.05, merge_r=[0, 2], prune_keep=[1.0], skip=[0], quantize=["float"])
    fast = nnforge.compile(model, (x,), backend=backend, budget=budget, calibration=cal, progress=False)
    assert fast.backend == f"{backend}+torch"
    assert "chosen:" in fast.notes[0] and "within budget" in fast.notes[0]
    # both candidates were timed on builds with the torch partition, then the chosen graph was built the same way
    assert len(built) >= 2 and all(a.backend == f"{backend}+torch" for a in built)
    assert [p.backend for p in fast.artifact.plan.partitions][-1] == "torch"
    assert fast(x).shape == (2, 10) and fast.accuracy["max_rel_error"] < 0.5


# ---------------------------------------------------------------------------------------
# the torch executor matches the interpreter on the model families
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_torch_executor_matches_the_interpreter(family):
    zm = zoo.build(family, "tiny")
    g = nnforge.PassManager("O2").run(import_torch(zm.model, zm.inputs, zm.dynamic_shapes))
    xs = [x.numpy() for x in zm.inputs]
    _close(run_graph_torch(g, xs), interpret(g, xs), tol=1e-5)
