"""The ops real architectures need beyond the core set (nnforge/ops/indexing.py, resize.py, group_norm,
hardswish/hardsigmoid): each ATen op imports to its IR op (no torch_op) and the interpreter matches eager
PyTorch; the torch executor matches the numpy reference; bad attributes are named. (Each backend's lowering is
checked against the interpreter in the CASES of test_backend_onnxrt / test_backend_tvm.)

Also: a model with complex intermediates runs, the complex values inside one torch partition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nnforge
from nnforge.backends.torch_exec import run_graph_torch
from nnforge.frontend.torch import import_torch
from nnforge.ir import Graph, OpError, TensorType, interpret

RNG = np.random.default_rng(0)


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def rand(*shape):
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32))


def idx(*shape, hi):
    return torch.from_numpy(RNG.integers(0, hi, shape))


# (name, function, inputs, the IR op it must become)
ATEN_CASES = [
    ("index two tensors", lambda x, i, j: x[i, :, j], (rand(4, 5, 6), idx(3, hi=4), idx(3, hi=6)), "index"),
    ("index adjacent", lambda x, i, j: x[:, i, j], (rand(2, 4, 5, 3), idx(2, 1, hi=4), idx(3, hi=5)), "index"),
    ("index None slot", lambda x, i: x[:, i], (rand(3, 5, 2), idx(4, hi=5)), "gather"),
    ("index negative", lambda x: x[torch.tensor([-1, 0]), torch.tensor([2, -2])], (rand(3, 4),), "index"),
    ("gather", lambda x, i: torch.gather(x, 1, i), (rand(3, 5), idx(3, 4, hi=5)), "gather_elements"),
    ("scatter", lambda x, s: x.scatter(0, torch.tensor([[0, 2, 1]]), s), (rand(3, 3), rand(2, 4)), "scatter_elements"),
    ("scatter value", lambda x: x.scatter(1, torch.tensor([[0], [2]]), 5.0), (rand(2, 3),), "scatter_elements"),
    (
        "scatter_add",
        lambda x, s: x.scatter_add(1, torch.tensor([[0, 0, 1], [2, 2, 2]]), s),
        (rand(2, 3), rand(2, 3)),
        "scatter_elements",
    ),
    ("cumsum", lambda x: torch.cumsum(x, dim=-1), (rand(3, 6),), "cumsum"),
    ("cumsum of a mask", lambda m: torch.cumsum(m, 1), (torch.tensor([[1, 1, 0, 1]]),), "cumsum"),
    ("sort", lambda x: torch.sort(x, dim=0, descending=True), (rand(5, 3),), "topk"),
    ("sort stable", lambda x: torch.sort(x, stable=True), (rand(2, 6),), "topk"),
    ("topk", lambda x: torch.topk(x, 2, dim=1, largest=False), (rand(3, 7),), "topk"),
    ("pad", lambda x: F.pad(x, (1, 2, 0, 3), value=-1.5), (rand(1, 2, 3, 4),), "pad"),
    ("pad crops", lambda x: F.pad(x, (-1, 2)), (rand(2, 5),), "pad"),
    ("upsample nearest", lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (rand(1, 2, 3, 4),), "upsample2d"),
    ("upsample to a size", lambda x: F.interpolate(x, size=(6, 5), mode="nearest"), (rand(1, 2, 3, 5),), "upsample2d"),
    (
        "upsample bilinear",
        lambda x: F.interpolate(x, size=(7, 5), mode="bilinear", align_corners=False),
        (rand(1, 2, 3, 4),),
        "upsample2d",
    ),
    (
        "upsample bilinear align_corners",
        lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
        (rand(1, 2, 3, 4),),
        "upsample2d",
    ),
    ("group_norm", torch.nn.GroupNorm(2, 6), (rand(2, 6, 3, 3),), "group_norm"),
    ("group_norm no affine", torch.nn.GroupNorm(3, 6, affine=False), (rand(2, 6, 4),), "group_norm"),
    ("hardswish", torch.nn.Hardswish(), (rand(3, 8) * 4,), "hardswish"),
    ("hardsigmoid", torch.nn.Hardsigmoid(), (rand(3, 8) * 4,), "hardsigmoid"),
]


@pytest.mark.parametrize("name,fn,inputs,ir_op", ATEN_CASES, ids=[c[0] for c in ATEN_CASES])
def test_aten_op_imports_whole_and_matches_eager(name, fn, inputs, ir_op):
    model = fn if isinstance(fn, torch.nn.Module) else Fn(fn)
    graph = import_torch(model, inputs)
    ops = {n.op for n in graph.nodes}
    assert ir_op in ops and "torch_op" not in ops, ops
    with torch.no_grad():
        want = model(*inputs)
    want = [t.numpy() for t in (want if isinstance(want, (tuple, list)) else [want])]
    got = interpret(graph, [x.numpy() for x in inputs])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_all_zero_pads_fold_away():
    graph = import_torch(Fn(lambda x: F.pad(x, (0, 0, 0, 0)) + 1), (rand(2, 3),))
    assert [n.op for n in graph.nodes] == ["add"]


def test_a_boolean_mask_index_is_kept_on_torch():
    """x[mask] has a data-dependent size: no IR op, and torch.export refuses it or keeps it opaque."""
    with pytest.raises(nnforge.NnforgeError):
        import_torch(Fn(lambda x: x[x > 0]), (rand(3, 4),), opaque=False)


# the torch executor against the numpy reference (the backends are checked in test_backend_*)
EXECUTOR_CASES = [
    ("index", [rand(4, 5, 6).numpy(), np.array([0, -1, 2]), np.array([[1], [3]])], {"axes": [0, 2]}),
    ("gather_elements", [rand(3, 4).numpy(), np.array([[0, 2, 1, 0]])], {"axis": 0}),
    ("scatter_elements", [rand(3, 4).numpy(), np.array([[1, 1], [0, 3], [2, 2]]), rand(3, 2).numpy()], {"axis": 1}),
    (
        "scatter_elements",
        [rand(3, 4).numpy(), np.array([[1, 1], [0, 3], [2, 2]]), rand(3, 2).numpy()],
        {"axis": 1, "reduction": "add"},
    ),
    ("cumsum", [np.arange(12).reshape(3, 4)], {"axis": 0}),
    ("topk", [np.array([[3.0, 1.0, 3.0, 2.0]], np.float32)], {"k": 4}),  # ties keep their order
    ("pad", [rand(2, 3).numpy()], {"pads": [1, -1, 0, 2], "value": 2.0}),
    ("upsample2d", [rand(1, 1, 3, 3).numpy()], {"size": [5, 4], "mode": "linear"}),
    ("group_norm", [rand(2, 4, 3).numpy(), rand(4).numpy(), rand(4).numpy()], {"num_groups": 2}),
]


@pytest.mark.parametrize("op,arrays,attrs", EXECUTOR_CASES, ids=[c[0] for c in EXECUTOR_CASES])
def test_torch_executor_matches_the_reference(op, arrays, attrs):
    g = Graph(op)
    xs = [g.add_input(f"x{i}", TensorType.of(a)) for i, a in enumerate(arrays)]
    g.outputs = list(g.add_node(op, xs, attrs).outputs)
    for got, want in zip(run_graph_torch(g, arrays), interpret(g, arrays)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "op,shapes,attrs,message",
    [
        ("index", [(3, 4), (2,), (3,)], {"axes": [0, 1]}, "broadcast"),
        ("index", [(3, 4), (2,)], {"axes": [0, 1]}, "1 index tensor"),
        ("pad", [(3, 4)], {"pads": [1, 1]}, "2 per axis"),
        ("pad", [(3, 4)], {"pads": [0, -3, 0, -2]}, "crop more"),
        ("upsample2d", [(3, 4)], {"size": [2, 2]}, "NCHW"),
        ("upsample2d", [(1, 1, 3, 4)], {"size": [2, 2], "mode": "cubic"}, "cubic"),
        ("group_norm", [(2, 6, 3)], {"num_groups": 4}, "do not divide"),
        ("topk", [(3, 4)], {"k": 5}, "out of range"),
        ("scatter_elements", [(3, 4), (1, 4), (2, 4)], {}, "indices' shape"),
    ],
)
def test_bad_attributes_are_named(op, shapes, attrs, message):
    g = Graph(op)
    xs = [
        g.add_input(
            f"x{i}", TensorType(s, "int64" if 0 < i and op in ("index", "scatter_elements") and i < 2 else "float32")
        )
        for i, s in enumerate(shapes)
    ]
    if op == "index":
        xs = [xs[0]] + [g.add_input(f"i{k}", TensorType(x.shape, "int64")) for k, x in enumerate(xs[1:])]
    with pytest.raises(OpError, match=message):
        g.add_node(op, xs, attrs)


def test_complex_intermediates_stay_inside_one_torch_partition():
    """rfft + abs have complex values between them: both become torch_op nodes, which the torch executor runs
    in one partition; the real-valued ops around them still compile for the backend."""

    def spectrum(x):
        y = torch.relu(x) * 2.0 + 1.0
        return torch.fft.rfft(y).abs() * 0.5 - 1.0 + y[..., :9]

    model, x = Fn(spectrum), rand(2, 16)
    graph = import_torch(model, (x,))
    assert {n.op for n in graph.nodes if n.output.dtype.startswith("complex")} == {"torch_op"}
    for backend in ("onnxrt", "tvm"):
        cm = nnforge.compile(model, (x,), backend=backend, cache=False, progress=False, min_block_size=1)
        assert cm.backend == f"{backend}+torch"
        plan = cm.artifact.plan
        complex_values = {n.output.name for n in cm.graph.nodes if n.output.dtype.startswith("complex")}
        assert complex_values, "the compiled graph keeps the complex intermediate"
        for p in plan.partitions:  # no complex value crosses a partition boundary
            assert not complex_values & set(p.inputs + p.outputs), (p.backend, p.inputs, p.outputs)
        assert [p.backend for p in plan.partitions].count(backend) >= 1
        np.testing.assert_allclose(np.asarray(cm(x)), spectrum(x).numpy(), rtol=1e-5, atol=1e-5)


def test_onnx_group_normalization_imports_as_group_norm():
    """GroupNormalization (opset 21, scale and bias per channel) becomes group_norm."""
    import onnx
    from onnx import TensorProto, helper

    from nnforge.frontend.onnx import import_onnx

    x = rand(2, 6, 3, 3).numpy()
    scale, bias = rand(6).numpy(), rand(6).numpy()
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3, epsilon=1e-3)
    graph = helper.make_graph(
        [node],
        "gn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(bias, "b")],
    )
    g = import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert [nd.op for nd in g.nodes] == ["group_norm"]
    want = F.group_norm(torch.from_numpy(x), 3, torch.from_numpy(scale), torch.from_numpy(bias), 1e-3).numpy()
    np.testing.assert_allclose(interpret(g, [x])[0], want, rtol=1e-5, atol=1e-5)
