"""The elementwise, reduce and region families (nnforge/ops): the torch executor runs every op as the numpy
reference does, the one activation table serves every executor, and TVM's broadcasting ops are read off
the registry. (The ONNX and TVM lowerings of every op are checked in test_backend_onnxrt / test_backend_tvm.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnforge.backends.torch_exec import run_graph_torch
from nnforge.ir import REGISTRY, Graph, TensorType, interpret
from nnforge.ops import elementwise

RNG = np.random.default_rng(0)
FAMILIES = ("nnforge.ops.elementwise", "nnforge.ops.reduce", "nnforge.ops.region")


def rand(*shape, dtype="float32"):
    return RNG.standard_normal(shape).astype(dtype)


def pos(*shape):
    return RNG.uniform(0.1, 3.0, shape).astype("float32")


def ints(*shape, dtype="int64"):
    return RNG.integers(-5, 6, shape).astype(dtype)


def bools(*shape):
    return RNG.random(shape) < 0.5


def special(*shape):
    """Values with NaN and +-inf among them."""
    x = rand(*shape)
    x.flat[::3] = np.nan
    x.flat[1::5] = np.inf
    x.flat[2::7] = -np.inf
    return x


REGION_INT = [["div", [0, 1], {}], ["cast", [2], {"dtype": "float32"}], ["tanh", [3], {}]]
REGION_FLOAT = [
    ["mul", [0, 1], {}],
    ["add", [2, 0], {}],
    ["gelu", [3], {"approximate": "tanh"}],
    ["clamp", [4], {"max": 1.0}],
]

# (op, inputs, attrs)
CASES = [
    *[(op, [rand(2, 3, 4), rand(3, 1)], {}) for op in ("add", "sub", "mul", "maximum", "minimum")],
    *[(op, [special(3, 4), special(3, 4)], {}) for op in ("maximum", "minimum")],
    ("div", [rand(2, 3), pos(3)], {}),
    ("div", [ints(3, 4), np.array([[2, -3, 4, 1]] * 3, np.int64)], {}),
    ("div", [ints(3, 4), np.array([[2, -3, 4, 1]] * 3, np.int64)], {"rounding": "trunc"}),
    ("isnan", [special(3, 4)], {}),
    ("pow", [pos(3, 4), rand(3, 4)], {}),
    *[(op, [rand(3, 4).round(), rand(4).round()], {}) for op in ("eq", "ne", "lt", "le", "gt", "ge")],
    ("logical_and", [bools(3, 4), bools(3, 4)], {}),
    ("hardswish", [rand(3, 9) * 4], {}),
    ("hardsigmoid", [rand(3, 9) * 4], {}),
    ("logical_or", [bools(3, 4), bools(1, 4)], {}),
    ("logical_not", [bools(5)], {}),
    ("where", [bools(3, 4), rand(3, 4), rand(4)], {}),
    *[
        (op, [rand(3, 5)], {})
        for op in (
            "exp",
            "tanh",
            "sigmoid",
            "erf",
            "sin",
            "cos",
            "silu",
            "floor",
            "ceil",
            "neg",
            "abs",
            "relu",
            "reciprocal",
        )
    ],
    *[(op, [pos(3, 5)], {}) for op in ("log", "sqrt", "rsqrt")],
    ("relu", [ints(7, dtype="int32")], {}),
    ("relu", [special(7)], {}),
    ("abs", [ints(7)], {}),
    ("gelu", [rand(3, 5)], {"approximate": "none"}),
    ("gelu", [rand(3, 5)], {"approximate": "tanh"}),
    ("clamp", [special(4, 5)], {"min": -0.5, "max": 0.5}),
    ("clamp", [special(4, 5)], {"min": 0.0}),
    ("clamp", [rand(4, 5)], {}),
    ("clamp", [ints(9)], {"max": 2}),
    ("cast", [rand(3, 4) * 4], {"dtype": "int32"}),
    ("cast", [np.array([0.0, 0.5, -2.0], np.float32)], {"dtype": "bool"}),
    ("cast", [ints(5)], {"dtype": "float32"}),
    ("reduce_sum", [rand(2, 3, 4)], {"axes": [1]}),
    ("reduce_sum", [ints(2, 3)], {}),
    ("reduce_mean", [rand(2, 4, 16)], {"axes": [1], "keepdims": True}),  # a few outer elements
    ("reduce_mean", [ints(3, 4)], {"axes": [0]}),
    ("reduce_max", [special(4, 5)], {"axes": [1]}),
    ("reduce_min", [special(4, 5)], {"axes": [0], "keepdims": True}),
    ("argmax", [special(4, 5)], {"axis": 1}),
    ("argmax", [ints(4, 5)], {"axis": 0, "keepdims": True}),
    ("softmax", [rand(2, 7)], {"axis": -1}),
    ("log_softmax", [rand(2, 7)], {"axis": 0}),
    ("elementwise_region", [ints(4, 5), np.array([2], np.int64)], {"body": REGION_INT}),
    ("elementwise_region", [rand(2, 3, 8), rand(8)], {"body": REGION_FLOAT}),
]


def one_op(op, arrays, attrs) -> Graph:
    g = Graph(op)
    xs = [g.add_input(f"x{i}", TensorType(a.shape, a.dtype.name)) for i, a in enumerate(arrays)]
    g.outputs = [g.op(op, *xs, **attrs)]
    return g


def test_every_op_of_the_families_has_a_case():
    ops = {name for name, op in REGISTRY.items() if op.ref.__module__ in FAMILIES}
    assert len(ops) == 47
    assert sorted(ops - {c[0] for c in CASES}) == []


@pytest.mark.parametrize("op,arrays,attrs", CASES, ids=[c[0] for c in CASES])
def test_torch_executor_matches_the_reference(op, arrays, attrs):
    g = one_op(op, arrays, attrs)
    (want,), (got,) = interpret(g, arrays), run_graph_torch(g, arrays)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # NaN where the reference has NaN


def test_one_activation_table_for_every_executor():
    from nnforge.ops import linalg, lowbit

    assert linalg.ACTIVATIONS is lowbit.ACTIVATIONS is elementwise.ACTIVATIONS  # what linear_act / qlinear read
    y = special(4, 6)
    for name, act in elementwise.ACTIVATIONS.items():
        with np.errstate(invalid="ignore"):  # -inf * 0
            want = act(y)
        np.testing.assert_allclose(act.torch(torch.from_numpy(y)).numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_tvm_broadcasting_ops_are_the_elementwise_ops_with_several_inputs():
    from nnforge.backends import tvm_lower

    assert {op for op in REGISTRY if tvm_lower.broadcasts(op)} == {
        "add",
        "sub",
        "mul",
        "div",
        "pow",
        "maximum",
        "minimum",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_and",
        "logical_or",
        "where",
    }
