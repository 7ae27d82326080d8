"""The TVM backend against the reference interpreter: every op, symbolic shapes, cuda/arm builds, bundles."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import tvm
from toolchains import need

from nnforge.backends import tvm as tb
from nnforge.backends import tvm_lower
from nnforge.backends.base import get_backend
from nnforge.errors import NnforgeError, UnsupportedOpError
from nnforge.ir import REGISTRY, Graph, TensorType, interpret

RNG = np.random.default_rng(0)


class C:
    """Marks an array as a graph constant (weight) rather than an input."""

    def __init__(self, array):
        self.array = np.asarray(array)


def rand(*shape, dtype="float32", lo=None, hi=None):
    if lo is not None:
        return RNG.uniform(lo, hi, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def pos(*shape):
    return rand(*shape, lo=0.2, hi=3.0)


def ints(*shape, lo=-5, hi=6, dtype="int64"):
    return RNG.integers(lo, hi, shape).astype(dtype)


def bools(*shape):
    return RNG.random(shape) > 0.5


def nans(*shape):
    """Random floats with NaN, +inf and -inf sprinkled in (TVM's max/min would drop a NaN)."""
    x = rand(*shape).ravel()
    x[RNG.choice(x.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    return x.reshape(shape)


def one_op(op, items, **attrs):
    """A graph with one ``op`` node; items are arrays (inputs), C(array) (constants) or None."""
    g = Graph(op)
    args, feeds = [], []
    for i, it in enumerate(items):
        if it is None:
            args.append(None)
        elif isinstance(it, C):
            args.append(g.add_constant(it.array, f"c{i}"))
        else:
            args.append(g.add_input(f"x{i}", TensorType.of(it)))
            feeds.append(it)
    g.outputs = list(g.add_node(op, args, attrs).outputs)  # every output (topk has two)
    return g, feeds


def check(graph, feeds, rtol=1e-4, atol=1e-5, artifact=None):
    art = artifact or tb.build(graph, "cpu")
    got = art.run(feeds)
    ref = interpret(graph, feeds)
    assert len(got) == len(ref)
    for a, r in zip(got, ref):
        assert a.shape == r.shape, (a.shape, r.shape)
        assert a.dtype == r.dtype, (a.dtype, r.dtype)
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, r)
        else:
            np.testing.assert_allclose(a, r, rtol=rtol, atol=atol)
    return art


# (op, items, attrs): one case per line; every registry op must appear at least once
CASES = [
    *[(op, [rand(2, 3, 4), rand(3, 1)], {}) for op in ("add", "sub", "mul", "maximum", "minimum")],
    ("add", [rand(2, 3), C(rand(3))], {}),
    ("div", [rand(2, 3, 4), pos(4)], {}),
    ("div", [ints(3, 4), np.array([[2, -3, 0, 1]] * 3, np.int64)], {}),
    ("div", [ints(3, 4), np.array([[2, -3, 0, 1]] * 3, np.int64)], {"rounding": "trunc"}),
    ("isnan", [np.array([[1.0, np.nan, np.inf, -0.0]] * 3, np.float32)], {}),
    ("pow", [pos(3, 4), rand(3, 4)], {}),
    *[(op, [rand(3, 4).round(), rand(4).round()], {}) for op in ("eq", "ne", "lt", "le", "gt", "ge")],
    ("logical_and", [bools(3, 4), bools(3, 4)], {}),
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
    ("abs", [ints(7)], {}),
    ("gelu", [rand(4, 6)], {}),
    ("gelu", [rand(4, 6)], {"approximate": "tanh"}),
    ("clamp", [rand(4, 6)], {"min": -0.5, "max": 0.7}),
    ("clamp", [rand(4, 6)], {"min": 0.0}),
    ("clamp", [ints(9)], {"max": 2}),
    ("cast", [rand(4, 3) * 4], {"dtype": "int32"}),
    ("cast", [np.array([0.0, 0.5, -0.2, 2.0], np.float32)], {"dtype": "bool"}),
    ("cast", [ints(5)], {"dtype": "float32"}),
    ("cast", [bools(5)], {"dtype": "float32"}),
    ("cast", [rand(5)], {"dtype": "float16"}),
    ("reduce_sum", [rand(2, 3, 4)], {"axes": [1]}),
    ("reduce_sum", [rand(2, 3, 4)], {}),
    ("reduce_mean", [rand(2, 3, 4)], {"axes": [-1, 0], "keepdims": True}),
    ("reduce_max", [rand(2, 3, 4)], {"axes": [2]}),
    ("reduce_min", [rand(2, 3, 4)], {"axes": [0, 1]}),
    ("argmax", [rand(3, 7)], {"axis": 1}),
    ("argmax", [rand(3, 7, 2)], {"axis": 0, "keepdims": True}),
    ("softmax", [rand(2, 5, 3)], {"axis": 1}),
    ("log_softmax", [rand(2, 5)], {}),
    ("layer_norm", [rand(2, 3, 8), C(rand(8)), C(rand(8))], {"eps": 1e-6}),
    ("layer_norm", [rand(2, 3, 4)], {"naxes": 2}),
    ("layer_norm", [rand(2, 8), None, C(rand(8))], {}),
    ("rms_norm", [rand(2, 3, 8), C(rand(8))], {}),
    ("rms_norm", [rand(2, 8)], {"eps": 1e-3}),
    ("batch_norm", [rand(2, 3, 5, 4), C(rand(3)), C(pos(3)), C(rand(3)), C(rand(3))], {}),
    ("batch_norm", [rand(2, 3, 5), C(rand(3)), C(pos(3))], {"eps": 1e-3}),
    ("matmul", [rand(5, 4), rand(4, 6)], {}),
    ("matmul", [rand(2, 1, 3, 4), rand(5, 4, 6)], {}),
    ("matmul", [rand(4), rand(3, 4, 6)], {}),
    ("matmul", [rand(3, 4), C(rand(4))], {}),
    ("linear", [rand(2, 3, 16), C(rand(24, 16)), C(rand(24))], {}),
    ("linear", [rand(5, 16), C(rand(8, 16))], {}),
    ("conv2d", [rand(2, 3, 9, 8), C(rand(4, 3, 3, 3)), C(rand(4))], {"padding": [1, 1]}),
    (
        "conv2d",
        [rand(1, 4, 11, 10), C(rand(6, 2, 3, 3))],
        {"stride": [2, 1], "padding": [2, 1], "dilation": [2, 2], "groups": 2},
    ),
    ("conv2d", [rand(1, 4, 6, 6), C(rand(4, 1, 3, 3))], {"groups": 4, "padding": [1, 1]}),
    ("conv2d", [rand(1, 2, 1, 1), C(rand(2, 1, 1, 1))], {"groups": 2, "padding": [0, 1]}),  # K = 1 matmul
    ("max_pool2d", [rand(2, 3, 9, 9)], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}),
    ("max_pool2d", [rand(1, 2, 8, 7)], {"kernel": [3, 2], "stride": [2, 2], "ceil_mode": True}),
    ("max_pool2d", [rand(1, 2, 9, 9)], {"kernel": [2, 2], "stride": [1, 1], "dilation": [2, 2]}),
    ("avg_pool2d", [rand(2, 3, 9, 9)], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}),
    (
        "avg_pool2d",
        [rand(2, 3, 9, 9)],
        {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "count_include_pad": False},
    ),
    ("avg_pool2d", [rand(1, 2, 8, 8)], {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True}),
    ("avg_pool2d", [rand(1, 2, 8, 7)], {"kernel": [2, 2], "stride": [2, 2], "ceil_mode": True}),
    ("adaptive_avg_pool2d", [rand(2, 3, 7, 5)], {"output_size": [3, 2]}),
    ("adaptive_avg_pool2d", [rand(2, 3, 4, 4)], {"output_size": [1]}),
    ("sdpa", [rand(2, 2, 5, 8), rand(2, 2, 5, 8), rand(2, 2, 5, 8)], {}),
    ("sdpa", [rand(2, 3, 4), rand(2, 6, 4), rand(2, 6, 5), bools(3, 6) | np.eye(3, 6, dtype=bool)], {}),
    ("sdpa", [rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 1, 4, 4)], {"scale": 0.3}),
    ("sdpa", [rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)], {"is_causal": True}),
    ("sdpa", [rand(1, 4, 8), rand(1, 6, 8), rand(1, 6, 8)], {"is_causal": True}),
    ("reshape", [rand(2, 3, 4)], {"shape": [4, -1]}),
    ("permute", [rand(2, 3, 4)], {"perm": [2, 0, 1]}),
    ("expand", [rand(3, 1)], {"shape": [2, -1, 4]}),
    ("concat", [rand(2, 3), rand(2, 1), C(rand(2, 2))], {"axis": 1}),
    ("slice", [rand(4, 9)], {"axis": 1, "start": 1, "end": 8, "step": 2}),
    ("slice", [rand(4, 9)], {"axis": -1, "start": -3}),
    ("slice", [rand(6, 2)], {"axis": 0, "start": 2, "end": -1}),
    ("gather", [C(rand(10, 4)), ints(2, 3, lo=-10, hi=10)], {}),
    ("gather", [rand(3, 5), np.array([4, 0], np.int32)], {"axis": 1}),
    ("squeeze", [rand(3, 1, 4, 1)], {"axes": [1, -1]}),
    ("unsqueeze", [rand(3, 4)], {"axes": [0, -1]}),
    ("full_like", [rand(2, 3)], {"value": 1.5}),
    ("full_like", [rand(2, 3)], {"value": -2, "dtype": "int64"}),
    ("arange", [], {"start": 2, "end": 11, "step": 3}),
    # indexing, scans, selection (nnforge/ops/indexing.py)
    ("index", [rand(4, 5, 6), np.array([0, -1, 2]), np.array([[1], [3]])], {"axes": [0, 2]}),  # apart: dims first
    ("index", [rand(4, 5, 6, 3), np.array([[0, 1]]), np.array([1, -4], np.int32)], {"axes": [1, 2]}),  # in place
    ("gather_elements", [rand(3, 4), ints(2, 4, lo=0, hi=3)], {"axis": 0}),
    ("scatter_elements", [rand(3, 4), np.array([[0, 2, 1, 0]]), rand(1, 4)], {"axis": 0}),
    ("scatter_elements", [rand(3, 4), ints(3, 2, lo=0, hi=4), rand(3, 2)], {"axis": 1, "reduction": "add"}),
    ("cumsum", [rand(3, 4)], {"axis": 1}),
    ("cumsum", [ints(3, 4)], {"axis": 0}),
    ("topk", [rand(3, 7)], {"k": 3}),
    ("topk", [rand(6, 3)], {"k": 6, "axis": 0, "largest": False}),  # a sort
    # padding, resizing, group norm, hard activations
    ("pad", [rand(1, 2, 4, 5)], {"pads": [0, 0, 1, 2, 0, 0, 2, -1], "value": 0.5}),
    ("pad", [rand(2, 6)], {"pads": [0, -1, 0, -2]}),
    ("upsample2d", [rand(1, 2, 4, 5)], {"size": [8, 10]}),
    ("upsample2d", [rand(1, 2, 4, 5)], {"size": [6, 7], "mode": "linear"}),
    ("upsample2d", [rand(1, 2, 4, 5)], {"size": [7, 9], "mode": "linear", "align_corners": True}),
    ("group_norm", [rand(2, 6, 3, 4), C(rand(6)), C(rand(6))], {"num_groups": 3}),
    ("group_norm", [rand(2, 6, 5)], {"num_groups": 2, "eps": 1e-3}),
    ("hardswish", [rand(3, 9) * 4], {}),
    ("hardsigmoid", [rand(3, 9) * 4], {}),
    *[(op, [nans(4, 5)], {}) for op in ("hardswish", "hardsigmoid")],
    *[(op, [nans(4, 5), nans(5)], {}) for op in ("maximum", "minimum")],
    ("relu", [nans(4, 5)], {}),
    ("clamp", [nans(4, 5)], {"min": -0.5, "max": 0.5}),
    ("reduce_max", [nans(4, 5)], {"axes": [1]}),
    ("reduce_min", [nans(4, 5)], {"axes": [0], "keepdims": True}),
    ("max_pool2d", [nans(1, 2, 6, 6)], {"kernel": [2, 2], "stride": [2, 2]}),
    *[
        ("linear_act", [rand(2, 3, 16), C(rand(24, 16)), C(rand(24))], {"act": a})
        for a in ("none", "relu", "gelu", "gelu_tanh", "silu")
    ],
    ("linear_act", [rand(5, 16), C(rand(8, 16))], {"act": "gelu"}),
    ("attention", [rand(2, 5, 8), rand(2, 6, 8), rand(2, 6, 12)], {"num_heads": 2}),
    ("attention", [rand(2, 5, 8), rand(2, 5, 8), rand(2, 5, 8), rand(2, 1, 5, 5)], {"num_heads": 4, "scale": 0.5}),
    (
        "attention",
        [rand(1, 6, 8), rand(1, 6, 8), rand(1, 6, 8), bools(6, 6) | np.eye(6, dtype=bool)],
        {"num_heads": 2, "is_causal": True},
    ),
    (
        "elementwise_region",
        [ints(4, 5), C(np.array([2], np.int64))],
        {"body": [["div", [0, 1], {}], ["cast", [2], {"dtype": "float32"}], ["tanh", [3], {}]]},
    ),
]


def _case_id(case):
    op, items, attrs = case
    return op + ("-" + "-".join(f"{k}" for k in attrs) if attrs else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_op_matches_interpreter(case):
    op, items, attrs = case
    g, feeds = one_op(op, items, **attrs)
    check(g, feeds)


# the ops that passes (low-bit, sparsity, tokens, fusion) and the opaque-op fallback create are checked in their
# own tests (test_quantize, test_sparsity, test_tokens, test_fusion, test_partition), not in CASES
EXTRA_OPS = {
    "qlinear",
    "qconv2d",
    "qgather",
    "sparse_linear",
    "token_merge",
    "token_prune",
    "attention_scores",
    "grid_merge",  # ToMe for diffusion: tests/test_diffusion_tome.py checks it on every backend
    "elementwise_region",
    "torch_op",
    "onnx_node",  # runs on ONNX Runtime; tests/test_onnx_passthrough.py covers its TVM partitions
    "cached_attention",  # the decoder's ops: tests/test_llm.py checks them on every backend
    "cached_attention_int8",
    "attention_mass",
}
CORE_OPS = sorted(set(REGISTRY) - EXTRA_OPS)


def test_every_core_op_has_a_lowering_and_a_case():
    """Every core op (the ops of nnforge/ir/ops.py before the families moved to nnforge/ops) lowers and is
    checked above."""
    assert len(CORE_OPS) > 60
    lowered = {name for name, op in REGISTRY.items() if "tvm" in op.impls}
    assert sorted(set(CORE_OPS) - lowered) == []
    assert sorted(set(CORE_OPS) - {c[0] for c in CASES}) == []


def _block_graph():
    """A small transformer block over symbolic batch and seq, written with the IR by hand."""
    d, heads = 16, 2
    g = Graph("block")
    ids = g.add_input("ids", TensorType(("batch", "seq"), "int64"))
    emb = g.add_constant(rand(50, d), "emb")
    pos = g.add_constant(rand(32, d), "pos")
    pos3 = g.add_constant(rand(1, 32, d), "pos3")
    x = g.op("add", g.op("gather", emb, ids), g.op("gather", pos, g.op("arange", end="seq")))
    x = g.op("add", x, g.op("slice", pos3, axis=1, end="seq"))  # Relax alone sees min(seq, 32)
    h = g.op("layer_norm", x, g.add_constant(rand(d), "ln_w"), g.add_constant(rand(d), "ln_b"))
    qkv = g.op("linear", h, g.add_constant(rand(3 * d, d) * 0.3, "wqkv"), g.add_constant(rand(3 * d), "bqkv"))
    qkv = g.op("permute", g.op("reshape", qkv, shape=["batch", "seq", 3, heads, d // heads]), perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("squeeze", g.op("slice", qkv, axis=0, start=i, end=i + 1), axes=[0]) for i in range(3))
    a = g.op("sdpa", q, k, v, is_causal=True)
    a = g.op("reshape", g.op("permute", a, perm=[0, 2, 1, 3]), shape=["batch*seq", d])
    a = g.op("linear", a, g.add_constant(rand(d, d) * 0.3, "wo"))
    x = g.op("add", x, g.op("reshape", a, shape=["batch", "seq", d]))
    f = g.op(
        "gelu", g.op("linear", g.op("rms_norm", x), g.add_constant(rand(4 * d, d) * 0.3, "w1")), approximate="tanh"
    )
    x = g.op("add", x, g.op("linear", f, g.add_constant(rand(d, 4 * d) * 0.3, "w2")))
    first = g.op("slice", x, axis=1, start=0, end="seq")  # symbolic end
    g.outputs = [g.op("reduce_mean", first, axes=[1]), g.op("argmax", x, axis=-1)]
    return g


def test_symbolic_batch_and_seq_two_sizes():
    g = _block_graph()
    art = tb.build(g, "cpu")
    assert art.meta["symbols"] and set(art.meta["symbols"]) >= {"batch", "seq"}
    for b, s in ((1, 5), (3, 12)):
        check(g, [RNG.integers(0, 50, (b, s)).astype(np.int64)], rtol=1e-4, atol=1e-4, artifact=art)


def test_symbolic_expression_input_and_full_like_arange():
    g = Graph("expr")
    x = g.add_input("x", TensorType(("n", 4)))
    y = g.add_input("y", TensorType(("2*n", 4)))
    z = g.op("concat", x, x, axis=0)
    g.outputs = [g.op("add", z, y), g.op("full_like", y, value=3.0, dtype="int32"), g.op("arange", end="2*n")]
    art = tb.build(g, "cpu")
    for n in (1, 4):
        check(g, [rand(n, 4), rand(2 * n, 4)], artifact=art)


def test_dim_expressions_become_tir_expressions():
    dims = tvm_lower.DimMap()
    env = {"batch": 3, "seq": 13}
    for expr in (
        "batch*seq",
        "seq//2 + 1",
        "floor(seq/2)",
        "Max(seq, 16) - 1",
        "Mod(seq, 4)",
        "2*batch*seq + seq",
        "(seq + 3)//4",
    ):
        from nnforge.ir.symbols import evaluate

        e = dims(expr)
        got = _eval_dim(e, env) if not isinstance(e, int) else e
        assert got == evaluate(expr, env), expr
    assert set(dims.vars) == {"batch", "seq"}
    with pytest.raises(NnforgeError, match="not an integer"):
        dims("seq/2")


def test_unrelated_symbols_broadcast_as_the_ir_says():
    g = Graph("two_symbols")
    x = g.add_input("x", TensorType(("n", 4)))
    y = g.add_input("y", TensorType(("m", 4)))
    g.outputs = [g.op("relu", g.op("add", x, y))]
    art = tb.build(g, "cpu")
    check(g, [rand(3, 4), rand(3, 4)], artifact=art)
    with pytest.raises(NnforgeError, match="failed to run"):
        art.run([rand(3, 4), rand(2, 4)])


FAMILIES = ("mlp", "cnn", "vit", "bert", "gpt")


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_tiny_models_through_torch_frontend(family):
    import nnforge.frontend.torch as frontend
    from nnforge.models import zoo

    zm = zoo.build(family, "tiny")
    g = frontend.import_torch(zm.model, zm.inputs, zm.dynamic_shapes)
    feeds = [t.numpy() for t in zm.inputs]
    art = check(g, feeds, rtol=1e-4, atol=1e-5)
    import torch

    with torch.no_grad():
        eager = zm.model(*zm.inputs)
    np.testing.assert_allclose(art.run(feeds)[0], eager.numpy(), rtol=1e-4, atol=1e-5)
    if family in ("bert", "gpt"):  # another batch and sequence length through the same library
        b, s = 3, 9
        other = [f[:1].repeat(b, 0)[:, :s] if f.shape[1] >= s else f for f in feeds]
        other = [np.ascontiguousarray(np.resize(f, (b, s))) for f in other]
        check(g, other, rtol=1e-4, atol=1e-5, artifact=art)


# ---- the default CPU schedules, kernel by kernel ----------------------------------------------------


def _eval_dim(e, env):
    """Value of a TIR shape expression (Var/IntImm/+,-,*,//,%) for concrete symbols."""
    kind = type(e).__name__
    if kind == "IntImm":
        return int(e.value)
    if kind == "Var":
        return env[e.name]
    ops = {
        "Add": lambda a, b: a + b,
        "Sub": lambda a, b: a - b,
        "Mul": lambda a, b: a * b,
        "FloorDiv": lambda a, b: a // b,
        "FloorMod": lambda a, b: a % b,
        "Max": max,
        "Min": min,
    }
    return ops[kind](_eval_dim(e.a, env), _eval_dim(e.b, env))


CANARY = 8192  # elements of fence on each side: more than any partial tile can overrun


def _run_kernel(prim, target, env, seed=0):
    """Run one PrimFunc with every buffer fenced by sentinel elements; returns (buffers, fences_intact)."""
    rng = np.random.default_rng(seed)
    lib = tvm.compile(tvm.IRModule({"main": prim.with_attr("global_symbol", "main")}), target=target)
    fenced, views = [], []
    for p in prim.params:
        shape = [_eval_dim(d, env) for d in p.shape]
        n, dt = int(np.prod(shape)), np.dtype(str(p.dtype))
        raw = np.empty((n + 2 * CANARY) * dt.itemsize + 64, np.uint8)
        off = (-raw.ctypes.data) % 64  # TVM wants 64-byte aligned data
        buf = raw[off : off + (n + 2 * CANARY) * dt.itemsize].view(dt)
        buf[:] = sentinel = np.array(77).astype(dt)
        view = buf[CANARY : CANARY + n].reshape(shape)
        view[...] = rng.standard_normal(shape) if dt.kind == "f" else rng.integers(0, 3, shape)
        fenced.append((buf, sentinel))
        views.append(view)
    lib(*[tvm.runtime.from_dlpack(v) for v in views])
    intact = all((b[:CANARY] == s).all() and (b[-CANARY:] == s).all() for b, s in fenced)
    return [v.copy() for v in views], intact


def _kernel_graphs():
    def linear(k, n, act):
        g = Graph(f"linear{n}")
        x = g.add_input("x", TensorType(("m", k)))
        g.outputs = [g.op("linear_act", x, g.add_constant(rand(n, k), "w"), g.add_constant(rand(n), "b"), act=act)]
        return g

    def attention(causal, masked):
        g = Graph("attn")
        q, k, v = (g.add_input(n, TensorType(("b", 2, "s", 16))) for n in "qkv")
        mask = g.add_input("mask", TensorType(("b", 1, "s", "s"))) if masked else None
        g.outputs = [g.op("sdpa", q, k, v, mask, is_causal=causal)]
        return g

    def batched():
        g = Graph("bmm")
        a, b = g.add_input("a", TensorType((2, 1, "s", 8))), g.add_input("b", TensorType((3, 8, "n")))
        g.outputs = [g.op("relu", g.op("matmul", a, b))]
        return g

    def convs():
        g = Graph("convs")
        x = g.add_input("x", TensorType(("b", 3, 9, 9)))
        y = g.op(
            "relu",
            g.op(
                "conv2d",
                x,
                g.add_constant(rand(8, 3, 3, 3), "w1"),
                g.add_constant(rand(8), "b1"),
                stride=[2, 2],
                padding=[1, 1],
            ),
        )
        y = g.op("conv2d", y, g.add_constant(rand(8, 2, 3, 3), "w2"), groups=4, padding=[1, 1])
        y = g.op(
            "batch_norm",
            g.op("conv2d", y, g.add_constant(rand(6, 8, 1, 1), "w3")),
            g.add_constant(rand(6), "m"),
            g.add_constant(pos(6), "v"),
        )
        g.outputs = [g.op("max_pool2d", y, kernel=[2, 2], stride=[2, 2], ceil_mode=True)]
        return g

    def rows():
        g = Graph("rows")
        x = g.add_input("x", TensorType(("b", "s", 24)))
        y = g.op(
            "layer_norm", g.op("softmax", x, axis=-1), g.add_constant(rand(24), "g"), g.add_constant(rand(24), "b")
        )
        g.outputs = [g.op("reduce_sum", g.op("permute", y, perm=[0, 2, 1]), axes=[2])]
        return g

    return [
        linear(48, 40, "gelu"),
        linear(24, 1001, "none"),
        attention(True, False),
        attention(False, True),
        batched(),
        convs(),
        rows(),
    ]


@pytest.mark.parametrize("index", range(7))
def test_default_cpu_schedules_stay_in_bounds_and_match_unscheduled(index):
    """Each scheduled kernel against the same kernel without schedules, on sizes that leave partial
    tiles (odd batch and sequence), with sentinel fences around every buffer."""
    g = _kernel_graphs()[index]
    target = tb.tvm_target(tb.get_target("cpu"))
    sched = tb.BACKEND.kernels(g, "cpu")
    plain = tb.BACKEND.kernels(g, "cpu", {"schedule": "none"})
    env = {"m": 7, "b": 3, "s": 13, "n": 37}
    kernels = [(gv.name_hint, f) for gv, f in sched.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels
    for name, f in kernels:
        assert f.attrs.get("tirx.is_scheduled"), f"{g.name}: kernel {name} got no schedule"
        got, intact = _run_kernel(f, target, env)
        want, _ = _run_kernel(plain[name], target, env)
        assert intact, f"{g.name}: kernel {name} wrote outside its buffers"
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5, err_msg=f"{g.name}: {name}")


@pytest.mark.parametrize("length", [3, 16, 49, 64, 70, 197])
def test_softmax_and_layer_norm_compute_row_by_row(length):
    """Softmax and layer norm run one parallel loop over the rows, each block computing its row under
    it (no intermediate as large as the input), with the elementwise steps vectorised at row lengths
    that are not whole vectors; same numbers as no schedule, nothing written outside the buffers."""
    g = Graph("rows")
    x = g.add_input("x", TensorType(("b", 2, length)))
    y = g.op("softmax", x, axis=-1)
    g.outputs = [
        g.op("layer_norm", g.op("add", y, x), g.add_constant(rand(length), "g"), g.add_constant(rand(length), "b"))
    ]
    target = tb.tvm_target(tb.get_target("cpu"))
    sched = tb.BACKEND.kernels(g, "cpu")
    plain = tb.BACKEND.kernels(g, "cpu", {"schedule": "none"})
    kernels = [
        (gv.name_hint, f)
        for gv, f in sched.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and ("softmax" in gv.name_hint or "layer_norm" in gv.name_hint)
    ]
    assert len(kernels) == 2, [n for n, _ in kernels]
    for name, f in kernels:
        text = f.script()
        assert text.count("T.parallel") == 1, f"{name}: the row loop is not shared\n{text}"
        assert "T.vectorized" in text, f"{name}: rows not vectorised"
        got, intact = _run_kernel(f, target, {"b": 3})
        want, _ = _run_kernel(plain[name], target, {"b": 3})
        assert intact, f"{name} wrote outside its buffers"
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_reduction_over_another_axis_is_not_redone_per_row():
    """x - mean(x, axis=1) is one kernel whose reduction is over another axis than the output rows: computed
    under the row loop it would be redone for every row, so it keeps its own parallel loop."""
    g = Graph("centre")
    x = g.add_input("x", TensorType(("b", 16, 24)))
    g.outputs = [g.op("sub", x, g.op("reduce_mean", x, axes=[1], keepdims=True))]
    ((name, f),) = [
        (gv.name_hint, f)
        for gv, f in tb.BACKEND.kernels(g, "cpu").functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    ]
    assert f.script().count("T.parallel") == 2, f.script()
    a = rand(3, 16, 24)
    np.testing.assert_allclose(tb.build(g, "cpu").run([a])[0], interpret(g, [a])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "op,shape,axes,keepdims",
    [
        ("reduce_mean", ("b", 5, 4, 16), [2], False),
        ("reduce_sum", ("b", 3, 2, 7), [1, -2], True),
        ("reduce_mean", (3, 4, 5), [0], True),
        ("reduce_sum", (3, 8, 5), [1], False),
    ],
)
def test_sums_over_a_few_outer_elements_are_elementwise(op, shape, axes, keepdims):
    """A sum or mean over at most 8 elements of outer axes (ToMe's keys averaged over heads) is written
    out term by term: one elementwise kernel, no reduction loop, same numbers as the interpreter."""
    g = Graph("few")
    x = g.add_input("x", TensorType(shape))
    g.outputs = [g.op("relu", g.op(op, x, axes=axes, keepdims=keepdims))]
    kernels = [f for _, f in tb.BACKEND.kernels(g, "cpu").functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "T.axis.reduce" not in kernels[0].script()
    a = rand(*[2 if d == "b" else d for d in shape])
    np.testing.assert_allclose(tb.build(g, "cpu").run([a])[0], interpret(g, [a])[0], rtol=1e-6, atol=1e-6)


def _static_kernels(g):
    """(name, scheduled, unscheduled) for each matmul-like kernel of a graph with static shapes."""
    sched = tb.BACKEND.kernels(g, "cpu")
    plain = tb.BACKEND.kernels(g, "cpu", {"schedule": "none"})
    return [
        (gv.name_hint, f, plain[gv.name_hint])
        for gv, f in sched.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
        and any(w in gv.name_hint for w in ("matmul", "conv2d_mm", "im2col", "winograd"))
    ]


@pytest.mark.parametrize(
    "m,k,n,act",
    [
        (1, 64, 256, "relu"),
        (1, 48, 1000, "gelu"),
        (1, 40, 37, "none"),
        (1, 33, 1001, "none"),
        (1, 16, 24, "silu"),
        (3, 40, 128, "relu"),
    ],
)
def test_batch1_linear_gets_the_gemv_schedule(m, k, n, act):
    """A one-row linear layer (GEMV) is register-blocked by CPUMatmul (dlight's trait detection
    rejects a matmul without an I axis): parallel over J, vectorised, same numbers as no schedule,
    nothing written outside its buffers; the weight is never copied per call, and where a column tile
    is narrower than the layer it is packed at load into panels that each thread streams."""
    from nnforge.backends import tvm_schedule as ts

    g = Graph("gemv")
    x = g.add_input("x", TensorType((m, k)))
    g.outputs = [g.op("linear_act", x, g.add_constant(rand(n, k), "w"), g.add_constant(rand(n), "b"), act=act)]
    target = tb.tvm_target(tb.get_target("cpu"))
    ((name, f, plain),) = _static_kernels(g)
    with target:
        assert ts.CPUMatmul().apply(plain, target, False) is not None, "CPUMatmul did not take the GEMV"
    text = f.script()
    assert "T.parallel" in text and "T.vectorized" in text
    if n % 8 == 0:  # a whole-vector or 8-column tile divides J: the weight is never copied
        assert "pad" not in text
    nr = ts.pick_gemv_nr(n, ts.vector_lanes(target, 32), m)
    if nr and nr < n:  # the weight was packed at load into panels [N/nr, K, nr], streamed front to back
        assert f"T.Buffer((T.int64({n // nr}), T.int64({k}), T.int64({nr}))" in text, text
    got, intact = _run_kernel(f, target, {})
    want, _ = _run_kernel(plain, target, {})
    assert intact, f"{name} wrote outside its buffers"
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [96, 2048])
def test_a_decode_step_linear_takes_the_streaming_gemv(n):
    """A linear on one token per sequence ([batch, 1, K], an LLM's decode build) is tvm_gemv's float kernel: the
    weight re-laid out at load as [N/T, K, T] and T accumulators per row in registers, for any batch."""
    g = Graph("decode_linear")
    x = g.add_input("x", TensorType(("batch", 1, 64)))
    g.outputs = [g.op("linear", x, g.add_constant(rand(n, 64), "w"), g.add_constant(rand(n), "b"))]
    kernels = tb.BACKEND.kernels(g, "cpu")
    assert [gv.name_hint for gv in kernels.functions if "gemv" in gv.name_hint] == [f"gemv_f32_{n}x64"]
    art = tb.build(g, "cpu")
    for batch in (1, 3):
        xs = rand(batch, 1, 64)
        np.testing.assert_allclose(art.run([xs])[0], interpret(g, [xs])[0], rtol=1e-5, atol=1e-5)


def test_matmul_tile_widths_are_powers_of_two():
    """Column tiles of 28, 40 or 49 made LLVM's MR-row micro-kernel 10-40x slower: J is tiled by a
    power of two that divides it, or padded; a one-row matmul takes wide whole-vector tiles."""
    from nnforge.backends.tvm_schedule import _pick_nr, pick_gemv_nr

    for n_j in (2048, 196, 49, 28, 10, 1000, 384, 12544, 3136, 784, 37, 1001, 24, 3, 1):
        nr = _pick_nr(n_j, 16, 2)
        assert nr & (nr - 1) == 0 and nr <= 32, (n_j, nr)
    assert _pick_nr(196, 16, 2) == 32 and _pick_nr(784, 16, 2) == 16 and _pick_nr(10, 16, 2) == 16
    assert pick_gemv_nr(2048, 16) == 256 and pick_gemv_nr(1000, 16) == 40 and pick_gemv_nr(37, 16) is None
    assert pick_gemv_nr(2048, 16, 3) == 64 and pick_gemv_nr(1000, 16, 2) is None  # few rows: 4 vectors at most


@pytest.mark.parametrize(
    "cin,hw,cout,k,stride", [(8, 14, 12, 3, 1), (6, 7, 10, 3, 1), (8, 14, 8, 1, 2), (3, 15, 8, 7, 2)]
)
def test_conv_kernels_with_small_outputs_stay_in_bounds(cin, hw, cout, k, stride):
    """Convolutions with 14x14, 7x7 and strided outputs against the unscheduled kernels, fenced: 3x3
    stride 1 as Winograd (an odd 7x7 output: a half tile at the edge), the others as im2col (inner loop
    split by the output width) + matmul (J = 64: padded column tiles)."""
    g = Graph("conv")
    x = g.add_input("x", TensorType((1, cin, hw, hw)))
    y = g.op(
        "conv2d",
        x,
        g.add_constant(rand(cout, cin, k, k), "w"),
        g.add_constant(rand(cout), "b"),
        stride=[stride, stride],
        padding=[k // 2, k // 2],
    )
    g.outputs = [g.op("relu", y)]
    target = tb.tvm_target(tb.get_target("cpu"))
    kernels = _static_kernels(g)
    winograd = k == 3 and stride == 1
    assert any(("winograd_output" if winograd else "conv2d_mm") in name for name, _, _ in kernels)
    for name, f, plain in kernels:
        assert f.attrs.get("tirx.is_scheduled")
        if "im2col" in name:
            o = (hw + 2 * (k // 2) - k) // stride + 1  # output width: the inner loop is split by it
            split = rf"T\.axis\.spatial\(T\.int64\({o * o}\), \w+ \* T\.int64\({o}\) \+ \w+\)"
            assert re.search(split, f.script()), name
        got, intact = _run_kernel(f, target, {})
        want, _ = _run_kernel(plain, target, {})
        assert intact, f"{name} wrote outside its buffers"
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_keeps_its_output_row_innermost(ceil_mode):
    """Max pool 3x3 / 2 (ResNet's stem) is one elementwise kernel (the window written out term by term,
    NaN kept): rows in parallel, the output row innermost for LLVM to vectorise; fenced, same as no
    schedule, a NaN in a window gives NaN."""
    g = Graph("pool")
    x = g.add_input("x", TensorType((1, 16, 64, 64)))
    g.outputs = [g.op("max_pool2d", g.op("relu", x), kernel=[3, 3], stride=[2, 2], padding=[1, 1], ceil_mode=ceil_mode)]
    target = tb.tvm_target(tb.get_target("cpu"))
    sched = tb.BACKEND.kernels(g, "cpu")
    plain = tb.BACKEND.kernels(g, "cpu", {"schedule": "none"})
    pools = [(gv.name_hint, f) for gv, f in sched.functions_items() if "pool" in gv.name_hint]
    assert len(pools) == 1
    for name, f in pools:
        text = f.script()
        width = 33 if ceil_mode else 32
        row_inside = rf"in T\.parallel\(T\.int64\(\d+\)\):\s*\n\s*for \w+ in range\(T\.int64\({width}\)\)"
        assert f.attrs.get("tirx.is_scheduled") and re.search(row_inside, text), text
        got, intact = _run_kernel(f, target, {})
        want, _ = _run_kernel(plain[name], target, {})
        assert intact, f"{name} wrote outside its buffers"
        np.testing.assert_allclose(got[-1], want[-1], rtol=0, atol=0)
    xs = rand(1, 16, 64, 64)
    xs[0, 3, 10, 20] = np.nan
    y = tb.build(g, "cpu").run([xs])[0]
    assert np.isnan(y[0, 3, 5, 10]) and np.isnan(y).sum() == 1  # the only window holding (10, 20)


def test_bad_inputs_are_named():
    g, feeds = one_op("relu", [rand(2, 3)])
    art = tb.build(g, "cpu")
    with pytest.raises(NnforgeError, match="x0"):
        art.run([rand(2, 4)])
    with pytest.raises(NnforgeError, match="dtype"):
        art.run([ints(2, 3)])


def test_supports_lists_nodes_without_lowering(monkeypatch):
    g, feeds = one_op("erf", [rand(3)])
    backend = get_backend("tvm")
    assert backend.supports(g, "cpu") == []
    monkeypatch.delitem(REGISTRY["erf"].impls, "tvm")
    (u,) = backend.supports(g, "cpu")
    assert u.op == "erf" and u.node == g.outputs[0].name and "lowering" in u.reason
    with pytest.raises(UnsupportedOpError, match="erf"):
        backend.build(g, "cpu")


def test_save_load_round_trip(tmp_path):
    g = _block_graph()
    art = tb.build(g, "cpu")
    feeds = [RNG.integers(0, 50, (2, 7)).astype(np.int64)]
    before = art.run(feeds)
    names = art.save_files(tmp_path)
    assert set(names) == {"model.so", "tvm.json"}
    # the library holds code, not weights: the weights come back from the graph
    weights = sum(a.nbytes for a in g.constants.values())
    assert weights > 0
    loaded = tb.TVMArtifact.load_files(tmp_path, g, art.target, {})
    for a, b in zip(before, loaded.run(feeds)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "tvm.json").write_text("{not json")
    with pytest.raises(NnforgeError, match="tvm.json"):
        tb.TVMArtifact.load_files(tmp_path, g, art.target, {})


def test_progress_stages_and_unknown_options():
    g, feeds = one_op("tanh", [rand(4)])
    stages = []
    check(g, feeds, artifact=tb.build(g, "cpu", {"progress": stages.append}))
    assert stages[0] == "lowering to Relax" and stages[-1].startswith("done in")
    with pytest.raises(NnforgeError, match="unknown TVM backend option"):
        tb.build(g, "cpu", {"shedule": "none"})
    with pytest.raises(NnforgeError, match="schedule="):
        tb.build(g, "cpu", {"schedule": "fast"})


def test_embedded_params_build_matches():
    g, feeds = one_op("linear", [rand(3, 16), C(rand(8, 16)), C(rand(8))])
    art = tb.build(g, "cpu", {"embed_params": True})
    assert art.meta["params"] == []
    check(g, feeds, artifact=art)


def _small_mlp():
    g = Graph("mlp")
    x = g.add_input("x", TensorType(("batch", 32)))
    h = g.op("gelu", g.op("linear", x, g.add_constant(rand(64, 32), "w1"), g.add_constant(rand(64), "b1")))
    h = g.op("layer_norm", h, g.add_constant(rand(64), "g"), g.add_constant(rand(64), "b"))
    g.outputs = [g.op("softmax", g.op("linear", h, g.add_constant(rand(10, 64), "w2")))]
    return g


def test_cuda_build_without_gpu_keeps_cuda_source(tmp_path):
    g1, _ = one_op("conv2d", [rand(1, 2, 1, 1), C(rand(2, 1, 1, 1))], groups=2, padding=[0, 1])
    tb.build(g1, "cuda")  # a dlight GPU rule asserts on this one: the next rule must take it
    g = _small_mlp()
    art = tb.build(g, "cuda")
    assert "__global__" in art.cuda_source
    names = art.save_files(tmp_path)
    assert "model.cu" in names and "__global__" in (tmp_path / "model.cu").read_text()
    assert (tmp_path / "model.so").stat().st_size > 0
    if not tvm.cuda(0).exist:
        with pytest.raises(NnforgeError, match="no CUDA device"):
            art.run([rand(2, 32)])


@pytest.mark.gpu
@pytest.mark.skipif(not tvm.cuda(0).exist, reason="no CUDA device on this machine")
def test_cuda_runs_on_gpu():
    g = _small_mlp()
    check(g, [rand(3, 32)], rtol=1e-3, atol=1e-4, artifact=tb.build(g, "cuda"))
    gb = _block_graph()
    check(gb, [RNG.integers(0, 50, (2, 9)).astype(np.int64)], rtol=1e-3, atol=1e-3, artifact=tb.build(gb, "cuda"))


def test_arm_cross_compile_is_aarch64_elf(tmp_path):
    need("aarch64-linux-gnu-g++")
    g = _small_mlp()
    art = tb.build(g, "arm")
    assert set(art.save_files(tmp_path)) == {"model.so", "tvm.json"}
    head = (tmp_path / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    assert struct.unpack_from("<H", head, 18)[0] == 183  # EM_AARCH64


def test_arm_artifact_runs_under_qemu():
    """The cross-compiled library (NEON schedules: 4 lanes, 32 registers) against the interpreter;
    ``run`` goes through the bundle and nnforge.runtime.edge's aarch64 runner under qemu-aarch64."""
    need("aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-sysroot", "aarch64-tvm-runtime")
    for g, feeds in (
        (_block_graph(), [RNG.integers(0, 50, (3, 13)).astype(np.int64)]),
        (_kernel_graphs()[5], [rand(3, 3, 9, 9)]),
    ):
        check(g, feeds, rtol=1e-4, atol=1e-4, artifact=tb.build(g, "arm"))


def test_elementwise_region_lowers_its_steps_and_fuses():
    body = [
        ["mul", [0, 1], {}],
        ["add", [2, 3], {}],
        ["gelu", [4], {"approximate": "tanh"}],
        ["clamp", [5], {"max": 1.0}],
    ]
    g, feeds = one_op("elementwise_region", [rand(2, 3, 8), C(rand(8)), rand(3, 1)], body=body)
    check(g, feeds)
    from tvm import relax

    mod = tvm_lower.lower_graph(g).mod
    for t in (
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ):
        mod = t(mod)
    assert len([gv for gv in mod.get_global_vars() if gv.name_hint != "main"]) == 1  # the four steps: one kernel


@pytest.mark.parametrize("seq", [197, "s"])
def test_matmul_epilogue_that_reads_some_rows_stays_in_bounds(seq):
    """linear(x)[:, :1] + r[:, :1]: TVM's reverse_compute_inline would write the sliced epilogue for every
    row the matmul computes, past the end of the one-row output (heap corruption on a quantized ViT)."""
    g = Graph("rowslice")
    x, r = g.add_input("x", TensorType((1, seq, 64))), g.add_input("r", TensorType((1, seq, 32)))
    y = g.op("linear", x, g.add_constant(rand(32, 64), "w"), g.add_constant(rand(32), "b"))
    g.outputs = [g.op("add", g.op("slice", y, axis=1, start=0, end=1), g.op("slice", r, axis=1, start=0, end=1))]
    target = tb.tvm_target(tb.get_target("cpu"))
    plain = tb.BACKEND.kernels(g, "cpu", {"schedule": "none"})
    kernels = [
        (gv.name_hint, f)
        for gv, f in tb.BACKEND.kernels(g, "cpu").functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint
    ]
    assert kernels
    for name, f in kernels:
        assert f.attrs.get("tirx.is_scheduled"), f"kernel {name} got no schedule"
        got, intact = _run_kernel(f, target, {"s": 13})
        want, _ = _run_kernel(plain[name], target, {"s": 13})
        assert intact, f"kernel {name} wrote outside its buffers"
        np.testing.assert_allclose(got[-1], want[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin,h,w,cout,pad", [(3, 5, 7, 4, 0), (5, 9, 6, 3, 1), (2, 3, 3, 2, 0), (4, 1, 1, 3, 1)])
def test_winograd_convolution_matches_the_interpreter(cin, h, w, cout, pad):
    """3x3 stride-1 convolutions (Winograd on the cpu target) at odd, non-square and tiny sizes, with
    and without padding, batch 2: same numbers as the reference interpreter."""
    g = Graph("conv")
    x = g.add_input("x", TensorType((2, cin, h, w)))
    g.outputs = [
        g.op(
            "conv2d",
            x,
            g.add_constant(rand(cout, cin, 3, 3), "w"),
            g.add_constant(rand(cout), "b"),
            stride=[1, 1],
            padding=[pad, pad],
        )
    ]
    assert any("winograd" in gv.name_hint for gv, _ in tb.BACKEND.kernels(g, "cpu").functions_items())
    xs = rand(2, cin, h, w)
    np.testing.assert_allclose(tb.build(g, "cpu").run([xs])[0], interpret(g, [xs])[0], rtol=1e-5, atol=1e-5)
