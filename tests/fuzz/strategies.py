"""Hypothesis strategies for random, valid nnforge graphs.

``graphs()`` draws a few inputs, then appends random op applications one by one. Each op has a
small builder in ``BUILDERS`` (op name -> fn(draw, b) -> Value | None): it picks operands of the
right kind from the values built so far (or makes constants of a shape that broadcasts against
them), draws attributes, and keeps values in a well-conditioned range where the op needs it
(log of |x| + 0.5, exp of a clamped value). A builder returns None when nothing in the pool fits.
Array elements are drawn one by one (``hypothesis.extra.numpy.arrays``), so a failing case shrinks to
small, readable values along with the graph; floats lie on a grid of STEP (see ``_elements``).

Every graph verifies; the harness runs it through the interpreter, the pipelines and the backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnforge.ir import Graph, OpError, TensorType, Value, verify
from nnforge.ops.elementwise import ACTIVATIONS

MAX_RANK = 4
MAX_DIM = 5
MAX_NUMEL = 240
STEP = 2.0**-11  # float array elements are multiples of STEP (see _elements)


def _elements(dtype: str, lo, hi) -> st.SearchStrategy:
    """Array elements in [lo, hi]. A float is k * STEP for a drawn integer k: exact in float32, two bytes of
    hypothesis's 8 KiB per example (a drawn float takes eight, which would cut the arrays short), shrinking
    towards 0 (or the bound nearest it); and two different ones lie further apart than the harness's MARGIN,
    so the inputs alone never put a discontinuous op (floor, a comparison) within rounding of its boundary."""
    if dtype == "bool":
        return st.booleans()
    if dtype.startswith("int"):
        return st.integers(int(lo), int(hi))
    return st.integers(int(np.ceil(lo / STEP)), int(np.floor(hi / STEP))).map(lambda k: k * STEP)


def _array(draw, shape, dtype: str, lo=-2.0, hi=2.0) -> np.ndarray:
    # every element drawn on its own (no fill value), so each one shrinks
    return np.asarray(draw(arrays(dtype, shape, elements=_elements(dtype, lo, hi), fill=st.nothing())))


@st.composite
def shapes(draw, min_rank=1, max_rank=MAX_RANK):
    rank = draw(st.integers(min_rank, max_rank))
    dims = []
    for _ in range(rank):
        cap = max(1, min(MAX_DIM, MAX_NUMEL // max(1, int(np.prod(dims or [1])))))
        dims.append(draw(st.integers(1, cap)))
    return tuple(dims)


@dataclass
class Builder:
    """The graph being built, its pool of usable values and the graph inputs' arrays."""

    g: Graph
    draw: Callable
    feeds: list = field(default_factory=list)

    @property
    def pool(self) -> list[Value]:
        vals = list(self.g.inputs) + [o for n in self.g.nodes for o in n.outputs]
        return [v for v in vals if v.type.is_static and v.type.rank >= 1]  # scalars may be outputs, not operands

    def pick(self, pred=lambda v: True) -> Value | None:
        cands = [v for v in self.pool if pred(v)]
        return self.draw(st.sampled_from(cands)) if cands else None

    def const(self, shape, dtype="float32", lo=-2.0, hi=2.0) -> Value:
        return self.g.add_constant(_array(self.draw, tuple(shape), dtype, lo, hi), name="c")

    def op(self, name, *inputs, **attrs) -> Value:
        return self.g.op(name, *inputs, **attrs)


def _float(v: Value) -> bool:
    return v.dtype == "float32"


def _rank(lo, hi=MAX_RANK, pred=_float):
    return lambda v: pred(v) and lo <= v.type.rank <= hi


def _broadcastable(draw, shape) -> tuple:
    """A shape that broadcasts with ``shape``: some axes set to 1, maybe fewer leading axes."""
    drop = draw(st.integers(0, len(shape)))
    return tuple(1 if draw(st.booleans()) else d for d in shape[drop:])


def _operand(b: Builder, x: Value, dtype=None) -> Value:
    """A second operand for ``x``: another pool value of the same shape and dtype, or a broadcasting constant."""
    dtype = dtype or x.dtype
    same = [v for v in b.pool if v.dtype == dtype and v.shape == x.shape and v is not x]
    if same and b.draw(st.booleans()):
        return b.draw(st.sampled_from(same))
    lo, hi = (-3, 3) if dtype.startswith("int") else (-2.0, 2.0)
    return b.const(_broadcastable(b.draw, x.shape), dtype, lo, hi)


def _positive(b: Builder, x: Value) -> Value:
    return b.op("add", b.op("abs", x), b.const((), "float32", 0.5, 0.5))


def _axes(draw, rank, allow_none=True):
    if allow_none and draw(st.booleans()):
        return None
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return [a - rank if draw(st.booleans()) else a for a in axes]  # negative axes too


# ---------------------------------------------------------------------------------------
# builders: fn(draw, b) -> Value | None
# ---------------------------------------------------------------------------------------


def _binary(name):
    def build(draw, b):
        x = b.pick(lambda v: v.dtype in ("float32", "int64"))
        if x is None:
            return None
        y = _operand(b, x)
        if name == "div":
            y = b.op(
                "add",
                b.op("abs", y),
                b.const((), y.dtype, 1, 1) if y.dtype == "int64" else b.const((), y.dtype, 0.5, 0.5),
            )
            if x.dtype == "int64" and draw(st.booleans()):  # a negative divisor: floor vs truncation
                y = b.op("neg", y)
        if name == "pow":
            if x.dtype != "float32":
                return None
            return b.op("pow", _positive(b, x), b.const((), "float32", -1.5, 2.0))
        args = (x, y) if draw(st.booleans()) else (y, x)
        if name == "div":
            args = (x, y)
        return b.op(name, *args)

    return build


def _compare(name):
    def build(draw, b):
        x = b.pick(lambda v: v.dtype in ("float32", "int64"))
        return None if x is None else b.op(name, x, _operand(b, x))

    return build


def _logical(name):
    def build(draw, b):
        x = b.pick(lambda v: v.dtype == "bool")
        if x is None:
            return None
        if name == "logical_not":
            return b.op(name, x)
        return b.op(name, x, _operand(b, x, "bool"))

    return build


def _where(draw, b):
    c = b.pick(lambda v: v.dtype == "bool")
    x = b.pick(lambda v: v.dtype in ("float32", "int64"))
    if c is None or x is None:
        return None
    return b.op("where", c, x, _operand(b, x)) if draw(st.booleans()) else b.op("where", c, _operand(b, x), x)


_GUARDED = {  # unary ops whose domain needs care: how to prepare their input
    "log": _positive,
    "sqrt": _positive,
    "rsqrt": _positive,
    "reciprocal": _positive,
    "exp": lambda b, x: b.op("clamp", x, min=-6.0, max=6.0),
}


def _unary(name, float_only=True):
    def build(draw, b):
        x = b.pick(_float if float_only else (lambda v: v.dtype in ("float32", "int64")))
        if x is None:
            return None
        x = _GUARDED[name](b, x) if name in _GUARDED else x
        return b.op(name, x)

    return build


def _gelu(draw, b):
    x = b.pick(_float)
    return None if x is None else b.op("gelu", x, approximate=draw(st.sampled_from(["none", "tanh"])))


def _clamp(draw, b):
    x = b.pick(lambda v: v.dtype in ("float32", "int64"))
    if x is None:
        return None
    lo = draw(st.one_of(st.none(), st.integers(-2, 0).map(float)))
    hi = draw(st.one_of(st.none(), st.integers(0, 2).map(float)))
    return b.op("clamp", x, min=lo, max=hi)


def _cast(draw, b):
    x = b.pick(lambda v: v.dtype in ("float32", "int64", "bool"))
    if x is None:
        return None
    return b.op("cast", x, dtype=draw(st.sampled_from([d for d in ("float32", "int64", "bool") if d != x.dtype])))


def _reduce(name):
    def build(draw, b):
        x = b.pick(lambda v: v.dtype in ("float32",) + (("int64",) if name != "reduce_mean" else ()))
        if x is None:
            return None
        return b.op(name, x, axes=_axes(draw, x.type.rank), keepdims=draw(st.booleans()))

    return build


def _argmax(draw, b):
    x = b.pick(lambda v: v.dtype in ("float32", "int64"))
    if x is None:
        return None
    axis = draw(st.integers(-x.type.rank, x.type.rank - 1))
    return b.op("argmax", x, axis=axis, keepdims=draw(st.booleans()))


def _softmax(name):
    def build(draw, b):
        x = b.pick(_float)
        return None if x is None else b.op(name, x, axis=draw(st.integers(-x.type.rank, x.type.rank - 1)))

    return build


def _norm(name):
    def build(draw, b):
        x = b.pick(_float)
        if x is None:
            return None
        naxes = draw(st.integers(1, x.type.rank))
        norm_shape = x.shape[x.type.rank - naxes :]
        args = [x]
        if draw(st.booleans()):
            args.append(b.const(norm_shape, "float32", 0.5, 1.5))
            if name == "layer_norm" and draw(st.booleans()):
                args.append(b.const(norm_shape))
        return b.op(name, *args, naxes=naxes, eps=draw(st.sampled_from([1e-5, 1e-3])))

    return build


def _batch_norm(draw, b):
    x = b.pick(_rank(2))
    if x is None:
        return None
    c = x.shape[1]
    args = [x, b.const((c,)), b.const((c,), "float32", 0.5, 2.0)]
    if draw(st.booleans()):
        args += [b.const((c,)), b.const((c,))]
    return b.op("batch_norm", *args, eps=1e-5)


def _matmul(draw, b):
    x = b.pick(_rank(1))
    if x is None:
        return None
    n = draw(st.integers(1, MAX_DIM))
    if draw(st.booleans()):  # x on the left: [..., m, k] @ [k] | [k, n] | [batch..., k, n]
        k = x.shape[-1]
        choice = draw(st.integers(0, 2 if x.type.rank > 2 else 1))
        w_shape = [(k,), (k, n), _broadcastable(draw, x.shape[:-2]) + (k, n)][choice]
        return b.op("matmul", x, b.const(w_shape))
    rows = x.shape[0] if x.type.rank == 1 else x.shape[-2]  # x on the right: [n, rows] @ x
    return b.op("matmul", b.const((n, rows)), x)


def _linear(name):
    def build(draw, b):
        x = b.pick(_rank(1))
        if x is None:
            return None
        n = draw(st.integers(1, MAX_DIM))
        args = [x, b.const((n, x.shape[-1]))]
        if draw(st.booleans()):
            args.append(b.const((n,)))
        if name == "linear_act":
            return b.op(name, *args, act=draw(st.sampled_from(sorted(ACTIVATIONS))))
        return b.op(name, *args)

    return build


def _as_nchw(draw, b) -> Value | None:
    """A rank-4 float value: one from the pool, or a pool value reshaped to [1, C, H, W]."""
    x = b.pick(_rank(4, 4))
    if x is not None and draw(st.booleans()):
        return x
    y = b.pick(_float)
    if y is None:
        return x
    n = int(np.prod(y.shape))
    c = draw(st.sampled_from([d for d in (1, 2, 3) if n % d == 0]))
    h = draw(st.sampled_from([d for d in range(1, n // c + 1) if (n // c) % d == 0]))
    return b.op("reshape", y, shape=[1, c, h, n // c // h])


def _conv2d(draw, b):
    x = _as_nchw(draw, b)
    if x is None:
        return None
    _, c, h, w = x.shape
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
    out = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, min(3, h + 2))), draw(st.integers(1, min(3, w + 2)))
    pad = [draw(st.integers(0, 1)), draw(st.integers(0, 1))]
    dil = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    if (kh - 1) * dil[0] + 1 > h + 2 * pad[0] or (kw - 1) * dil[1] + 1 > w + 2 * pad[1]:
        return None
    args = [x, b.const((out, c // groups, kh, kw))]
    if draw(st.booleans()):
        args.append(b.const((out,)))
    return b.op(
        "conv2d",
        *args,
        stride=[draw(st.integers(1, 2)), draw(st.integers(1, 2))],
        padding=pad,
        dilation=dil,
        groups=groups,
    )


def _pool(name):
    def build(draw, b):
        x = _as_nchw(draw, b)
        if x is None:
            return None
        h, w = x.shape[2:]
        k = [draw(st.integers(1, min(3, h))), draw(st.integers(1, min(3, w)))]
        attrs = {
            "kernel": k,
            "stride": [draw(st.integers(1, 2)), draw(st.integers(1, 2))],
            "padding": [draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2))],
            "ceil_mode": draw(st.booleans()),
        }
        if name == "avg_pool2d":
            attrs["count_include_pad"] = draw(st.booleans())
        return b.op(name, x, **attrs)

    return build


def _adaptive(draw, b):
    x = _as_nchw(draw, b)
    if x is None:
        return None
    h, w = x.shape[2:]
    return b.op("adaptive_avg_pool2d", x, output_size=[draw(st.integers(1, h)), draw(st.integers(1, w))])


def _sdpa(draw, b):
    q = b.pick(_rank(2))
    if q is None:
        return None
    lk, dv = draw(st.integers(1, MAX_DIM)), draw(st.integers(1, MAX_DIM))
    batch = q.shape[:-2]
    k = b.const(batch + (lk, q.shape[-1]))
    v = b.const(batch + (lk, dv))
    args = [q, k, v]
    causal = draw(st.booleans()) and q.shape[-2] <= lk
    if not causal and draw(st.booleans()):
        mshape = _broadcastable(draw, batch + (q.shape[-2], lk))
        if draw(st.booleans()):
            mask = np.array(_array(draw, mshape, "bool"), ndmin=1)
            mask[..., 0] = True  # every query attends to something (an all-masked row is NaN everywhere)
            args.append(b.g.add_constant(mask.reshape(mshape), name="mask"))
        else:
            args.append(b.const(mshape))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.5, 0.125])))
    return b.op("sdpa", *args, is_causal=causal, scale=scale)


def _attention(draw, b):
    heads, d = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    x = b.pick(_rank(3, 3))
    if x is None:
        return None
    bsz, s, e = x.shape
    q = b.op("linear", x, b.const((heads * d, e)))
    lk = draw(st.integers(1, MAX_DIM))
    k, v = b.const((bsz, lk, heads * d)), b.const((bsz, lk, heads * d))
    causal = draw(st.booleans()) and s <= lk
    return b.op(
        "attention", q, k, v, num_heads=heads, is_causal=causal, scale=draw(st.one_of(st.none(), st.just(0.25)))
    )


def _reshape(draw, b):
    x = b.pick()
    if x is None:
        return None
    n = int(np.prod(x.shape))
    dims, rest = [], n
    for _ in range(draw(st.integers(0, 3))):
        d = draw(st.sampled_from([f for f in range(1, rest + 1) if rest % f == 0]))
        dims.append(d)
        rest //= d
    dims.append(rest)
    if draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return b.op("reshape", x, shape=dims)


def _permute(draw, b):
    x = b.pick(lambda v: v.type.rank >= 1)
    return None if x is None else b.op("permute", x, perm=draw(st.permutations(range(x.type.rank))))


def _expand(draw, b):
    x = b.pick(lambda v: v.type.rank < MAX_RANK and int(np.prod(v.shape)) <= 60)
    if x is None:
        return None
    shape = [d if d != 1 else draw(st.integers(1, 3)) for d in x.shape]
    shape = [-1 if draw(st.booleans()) and d == s else d for d, s in zip(shape, x.shape)]
    if draw(st.booleans()):
        shape = [draw(st.integers(1, 2))] + shape
    return b.op("expand", x, shape=shape)


def _concat(draw, b):
    x = b.pick(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    axis = draw(st.integers(-x.type.rank, x.type.rank - 1))
    parts = [x]
    for _ in range(draw(st.integers(1, 2))):
        shape = list(x.shape)
        shape[axis] = draw(st.integers(1, 3))
        parts.append(
            b.const(shape, x.dtype, -3, 3) if x.dtype != "bool" else b.g.add_constant(_array(draw, shape, "bool"), "c")
        )
    draw(st.randoms()).shuffle(parts)
    return b.op("concat", *parts, axis=axis)


def _slice(draw, b):
    x = b.pick(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    axis = draw(st.integers(-x.type.rank, x.type.rank - 1))
    n = x.shape[axis]
    start = draw(st.integers(-n, n - 1))
    end = draw(st.one_of(st.integers(-n, n + 2), st.just(2**62)))
    from nnforge.ops.shape import slice_len

    if slice_len(n, start, end, 1) < 1:
        return None
    return b.op("slice", x, axis=axis, start=start, end=end, step=draw(st.integers(1, 3)))


def _gather(draw, b):
    x = b.pick(lambda v: v.type.rank >= 1)
    if x is None:
        return None
    axis = draw(st.integers(-x.type.rank, x.type.rank - 1))
    n = x.shape[axis]
    idx_shape = draw(shapes(min_rank=0, max_rank=2))
    idx = b.const(idx_shape, "int64", -n, n - 1)
    return b.op("gather", x, idx, axis=axis)


def _squeeze(draw, b):
    x = b.pick(lambda v: 1 in v.shape)
    if x is None:
        return None
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    axes = draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
    return b.op("squeeze", x, axes=axes)


def _unsqueeze(draw, b):
    x = b.pick(lambda v: v.type.rank < MAX_RANK)
    if x is None:
        return None
    r = x.type.rank + 1
    return b.op("unsqueeze", x, axes=[draw(st.integers(-r, r - 1))])


def _full_like(draw, b):
    x = b.pick()
    if x is None:
        return None
    y = b.op(
        "full_like", x, value=float(draw(st.integers(-2, 2))), dtype=draw(st.sampled_from([None, "float32", "int64"]))
    )
    return b.op("add", y, _operand(b, y)) if y.dtype != "bool" else y  # something that reads it


def _arange(draw, b):
    start, step = draw(st.integers(-3, 3)), draw(st.integers(1, 3))
    end = start + step * draw(st.integers(1, MAX_DIM))
    r = b.op("arange", start=start, end=end, step=step, dtype=draw(st.sampled_from(["int64", "float32"])))
    return b.op("mul", r, _operand(b, r))


def _torch_op(draw, b):
    """An opaque ATen op (what the torch frontend keeps for ops it has no IR op for): backends fall back to torch."""
    x = b.pick(_float)
    if x is None:
        return None
    r = x.type.rank
    dim = draw(st.integers(-r, r - 1))
    t = {"shape": list(x.shape), "dtype": "float32"}
    target, args, outs = draw(
        st.sampled_from(
            [
                ("aten.cumsum.default", [{"$t": 0}, dim], [t]),
                ("aten.flip.default", [{"$t": 0}, [dim]], [t]),
                ("aten.roll.default", [{"$t": 0}, [draw(st.integers(-3, 3))], [dim]], [t]),
                ("aten.cummax.default", [{"$t": 0}, dim], [t, {**t, "dtype": "int64"}]),
            ]
        )
    )
    node = b.g.add_node("torch_op", [x], {"target": target, "args": args, "kwargs": {}, "out_types": outs})
    return node.outputs[0]


BUILDERS: dict[str, Callable] = {
    "torch_op": _torch_op,
    **{n: _binary(n) for n in ("add", "sub", "mul", "div", "maximum", "minimum", "pow")},
    **{n: _compare(n) for n in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{n: _logical(n) for n in ("logical_and", "logical_or", "logical_not")},
    "where": _where,
    **{
        n: _unary(n)
        for n in (
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "reciprocal",
            "tanh",
            "sigmoid",
            "erf",
            "sin",
            "cos",
            "silu",
            "floor",
            "ceil",
        )
    },
    **{n: _unary(n, float_only=False) for n in ("neg", "abs", "relu")},
    "gelu": _gelu,
    "clamp": _clamp,
    "cast": _cast,
    **{n: _reduce(n) for n in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min")},
    "argmax": _argmax,
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    "layer_norm": _norm("layer_norm"),
    "rms_norm": _norm("rms_norm"),
    "batch_norm": _batch_norm,
    "matmul": _matmul,
    "linear": _linear("linear"),
    "linear_act": _linear("linear_act"),
    "conv2d": _conv2d,
    "max_pool2d": _pool("max_pool2d"),
    "avg_pool2d": _pool("avg_pool2d"),
    "adaptive_avg_pool2d": _adaptive,
    "sdpa": _sdpa,
    "attention": _attention,
    "reshape": _reshape,
    "permute": _permute,
    "expand": _expand,
    "concat": _concat,
    "slice": _slice,
    "gather": _gather,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "full_like": _full_like,
    "arange": _arange,
}


@dataclass
class Case:
    graph: Graph
    inputs: list[np.ndarray]

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Case(\n{self.graph}\ninputs={[a.tolist() for a in self.inputs]})"


def _nonfinite(draw, a: np.ndarray) -> np.ndarray:
    """Sprinkle NaN, +Inf and -Inf into a float array (for the NaN/Inf propagation runs)."""
    a = np.array(a, copy=True)
    flat = a.reshape(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return a


@st.composite
def graphs(draw, max_ops: int = 10, ops: tuple[str, ...] | None = None, nonfinite: bool = False) -> Case:
    """A random valid graph of up to ``max_ops`` op applications (plus their guards) and its inputs.

    The outputs are the values nothing else reads (the last four of them), so every node counts.
    ``nonfinite`` puts NaN/Inf into the float inputs: every runner must propagate them like the reference.
    """
    # the number of ops first: drawn after the inputs' elements, hypothesis chose 1 half again as often
    want, tries = draw(st.integers(1, max_ops)), 0
    g = Graph("fuzz")
    b = Builder(g, draw)
    for k in range(draw(st.integers(1, 2))):
        shape = draw(shapes())
        dtype = draw(st.sampled_from(["float32", "float32", "float32", "int64", "bool"]))
        g.add_input(f"x{k}", TensorType(shape, dtype))
        arr = _array(draw, shape, dtype, -3 if dtype == "int64" else -2.0, 3 if dtype == "int64" else 2.0)
        b.feeds.append(_nonfinite(draw, arr) if nonfinite and dtype == "float32" else arr)
    names = sorted(ops or BUILDERS)
    while want > 0 and tries < 3 * max_ops:
        tries += 1
        before = len(g.nodes)
        try:
            BUILDERS[draw(st.sampled_from(names))](draw, b)
        except OpError:  # an attribute combination the op refuses: skip this step
            continue
        want -= len(g.nodes) > before
    if not g.nodes:
        x = g.inputs[0]
        b.op("neg", x) if x.dtype != "bool" else b.op("logical_not", x)
    read = {i for n in g.nodes for i in n.inputs}
    leaves = [o for n in g.nodes for o in n.outputs if o not in read]
    g.outputs = leaves[-4:]
    from nnforge.passes.cleanup import DeadCodeElimination

    DeadCodeElimination().run(g, None)  # the nodes only earlier leaves read
    verify(g)
    return Case(g, b.feeds)
