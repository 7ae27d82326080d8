"""Elementwise ops: arithmetic, comparisons and logic, ``where``, unary math, activations, ``clamp``, ``cast``.

Also what other families build on:

- ``ACTIVATIONS``: the one table of the activations fused ops apply (linear_act, qlinear, ...), each
  with its numpy reference, torch function, ONNX emitter and Relax lowering;
- NaN-propagating ``tvm_maximum`` / ``tvm_minimum`` / ``tvm_relu``: TVM's max/min become LLVM
  maxnum/minnum, which return the other operand for a NaN, while numpy and torch propagate it. On floats
  they are compare + select instead (a NaN fails every comparison, so it is kept), one more instruction
  per element;
- ``tvm_gelu_erf`` / ``tvm_gelu_tanh``: GELU from Relax erf/tanh, so FastMathTransform can vectorise it;
- ``onnx_minmax``: ONNX Max/Min, through int32 for int16 (ONNX Runtime has no int16 kernels for them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import special

from ..ir.graph import TensorType
from ..ir.registry import REQUIRED, OpError, defop, implement
from .common import LazyModule, R, broadcast_shapes, float_only, same_dtype, torch

_onnxrt = LazyModule("nnforge.backends.onnxrt")  # ONNX_DTYPES
_torch_dtypes = LazyModule("nnforge.ir.torch_dtypes")  # (imports torch)

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8")


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return dtype in INT_DTYPES


def onnx_dtype(dtype: str) -> int:
    """The ONNX TensorProto element type of an IR dtype (``Cast``'s ``to``)."""
    return _onnxrt.ONNX_DTYPES[dtype]


def _relax(name: str):
    """A Relax operator by its dotted name under ``tvm.relax.op`` ("add", "nn.silu")."""
    fn = R
    for part in name.split("."):
        fn = getattr(fn, part)
    return fn


# -- shape rules ----------------------------------------------------------------------------------


def _binary_infer(result_dtype=None):
    def infer(ts, attrs):
        a, b = ts
        dt = same_dtype(ts, "binary op")
        return [TensorType(broadcast_shapes(a.shape, b.shape), result_dtype or dt)]

    return infer


def _unary_infer(floats_only=True):
    def infer(ts, attrs):
        if floats_only:
            float_only(ts[0], "unary op")
        return [ts[0]]

    return infer


# -- numpy helpers --------------------------------------------------------------------------------


def sigmoid_ref(x):
    return special.expit(x)


def gelu_ref(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------------
# ops that are one function on every backend
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OneCall:
    ref: Callable  # numpy
    torch: str  # torch function
    onnx: str | None  # ONNX op type (None: lowered below)
    relax: str | None  # Relax operator under tvm.relax.op (None: lowered below)
    doc: str


_BINARY = {
    "add": _OneCall(np.add, "add", "Add", "add", "a + b, broadcasting"),
    "sub": _OneCall(np.subtract, "sub", "Sub", "subtract", "a - b, broadcasting"),
    "mul": _OneCall(np.multiply, "mul", "Mul", "multiply", "a * b, broadcasting"),
    "maximum": _OneCall(np.maximum, "maximum", None, None, "elementwise max; a NaN in either input gives NaN"),
    "minimum": _OneCall(np.minimum, "minimum", None, None, "elementwise min; a NaN in either input gives NaN"),
    "pow": _OneCall(np.power, "pow", "Pow", None, "a ** b, broadcasting"),
}
_COMPARE = {  # bool results
    "eq": _OneCall(np.equal, "eq", "Equal", "equal", "a == b"),
    "ne": _OneCall(np.not_equal, "ne", None, "not_equal", "a != b"),
    "lt": _OneCall(np.less, "lt", "Less", "less", "a < b"),
    "le": _OneCall(np.less_equal, "le", "LessOrEqual", "less_equal", "a <= b"),
    "gt": _OneCall(np.greater, "gt", "Greater", "greater", "a > b"),
    "ge": _OneCall(np.greater_equal, "ge", "GreaterOrEqual", "greater_equal", "a >= b"),
    "logical_and": _OneCall(np.logical_and, "logical_and", "And", None, "a and b (nonzero is true)"),
    "logical_or": _OneCall(np.logical_or, "logical_or", "Or", None, "a or b (nonzero is true)"),
}
_UNARY_FLOAT = {
    "exp": _OneCall(np.exp, "exp", "Exp", "exp", "e ** x"),
    "log": _OneCall(np.log, "log", "Log", "log", "natural logarithm"),
    "sqrt": _OneCall(np.sqrt, "sqrt", "Sqrt", "sqrt", "square root"),
    "rsqrt": _OneCall(lambda x: 1.0 / np.sqrt(x), None, None, "rsqrt", "1 / sqrt(x)"),
    "reciprocal": _OneCall(np.reciprocal, "reciprocal", "Reciprocal", None, "1 / x"),
    "tanh": _OneCall(np.tanh, "tanh", "Tanh", "tanh", "hyperbolic tangent"),
    "sigmoid": _OneCall(sigmoid_ref, "sigmoid", "Sigmoid", "sigmoid", "1 / (1 + exp(-x))"),
    "erf": _OneCall(special.erf, "erf", "Erf", "erf", "the error function"),
    "sin": _OneCall(np.sin, "sin", "Sin", "sin", "sine"),
    "cos": _OneCall(np.cos, "cos", "Cos", "cos", "cosine"),
    "silu": _OneCall(lambda x: x * sigmoid_ref(x), None, None, "nn.silu", "x * sigmoid(x)"),
    "floor": _OneCall(np.floor, "floor", "Floor", "floor", "round down"),
    "ceil": _OneCall(np.ceil, "ceil", "Ceil", "ceil", "round up"),
}
_UNARY_ANY = {  # any dtype
    "neg": _OneCall(np.negative, "neg", "Neg", "negative", "-x"),
    "abs": _OneCall(np.abs, "abs", "Abs", "abs", "|x|"),
}
_ONE_CALL = {**_BINARY, **_COMPARE, **_UNARY_FLOAT, **_UNARY_ANY}

for _name, _op in _BINARY.items():
    defop(
        _name,
        _binary_infer(),
        num_inputs=(2, 2),
        kind="elementwise",
        doc=_op.doc,
        ref=lambda a, b, _f=_op.ref: _f(a, b),
    )
for _name, _op in _COMPARE.items():
    defop(
        _name,
        _binary_infer("bool"),
        num_inputs=(2, 2),
        kind="elementwise",
        doc=_op.doc,
        ref=lambda a, b, _f=_op.ref: _f(a, b),
    )
for _name, _op in _UNARY_FLOAT.items():
    defop(_name, _unary_infer(), kind="elementwise", doc=_op.doc, ref=lambda x, _f=_op.ref: _f(x))
for _name, _op in _UNARY_ANY.items():
    defop(_name, _unary_infer(False), kind="elementwise", doc=_op.doc, ref=lambda x, _f=_op.ref: _f(x))


@implement("torch", *(n for n, op in _ONE_CALL.items() if op.torch))
def _(cx, *xs):
    return getattr(torch, _ONE_CALL[cx.node.op].torch)(*xs)


@implement("onnxrt", *(n for n, op in _ONE_CALL.items() if op.onnx))
def _(cx, *xs):
    return cx.emit(_ONE_CALL[cx.node.op].onnx, xs)


@implement("tvm", *(n for n, op in _ONE_CALL.items() if op.relax))
def _(c, *xs):
    return _relax(_ONE_CALL[c.node.op].relax)(*xs)


@implement("tvm", "eq", "ne")
def _(c, a, b):
    """x == x and x != x are NaN tests (a common torch idiom) that TVM's LLVM build folds to constants: use isnan."""
    x, y = c.node.inputs
    if x is y and is_float(x.dtype):
        nan = c.emit(R.isnan(a))
        return nan if c.node.op == "ne" else R.logical_not(nan)
    return (R.equal if c.node.op == "eq" else R.not_equal)(a, b)


# -- maximum, minimum (NaN-propagating) --------------------------------------------------------------


def onnx_minmax(cx, onnx_op: str, a: str, b: str, dtype: str, out: str | None = None) -> str:
    """ONNX Max/Min; int16 goes through int32 (exact), as ONNX Runtime has no int16 kernels for them."""
    if dtype != "int16":
        return cx.emit(onnx_op, [a, b], out=out)
    wide = [cx.emit("Cast", [i], to=onnx_dtype("int32")) for i in (a, b)]
    return cx.emit("Cast", [cx.emit(onnx_op, wide)], out=out, to=onnx_dtype("int16"))


@implement("onnxrt", "maximum", "minimum")
def _(cx, a, b):
    return onnx_minmax(cx, "Max" if cx.node.op == "maximum" else "Min", a, b, cx.node.output.dtype)


def tvm_maximum(c, a, b, dtype: str):
    """max(a, b); NaN if b is NaN, else a's NaN is kept by the select (numpy and torch propagate it)."""
    if not is_float(dtype):
        return R.maximum(a, b)
    return R.where(c.emit(R.isnan(b)), b, c.emit(R.where(c.emit(R.less(a, b)), b, a)))


def tvm_minimum(c, a, b, dtype: str):
    """min(a, b), propagating NaN like ``tvm_maximum``."""
    if not is_float(dtype):
        return R.minimum(a, b)
    return R.where(c.emit(R.isnan(b)), b, c.emit(R.where(c.emit(R.less(b, a)), b, a)))


@implement("tvm", "maximum", "minimum")
def _(c, a, b):
    return (tvm_maximum if c.node.op == "maximum" else tvm_minimum)(c, a, b, c.in_type(0).dtype)


# -- pow, ne, rsqrt, reciprocal, silu: one call on some backends ----------------------------------------


@implement("tvm", "pow")
def _(c, a, b):
    dt = c.in_type(0).dtype
    if is_float(dt):
        return R.power(a, b)
    return R.astype(c.emit(R.power(R.astype(a, "float64"), R.astype(b, "float64"))), dt)


@implement("onnxrt", "ne")
def _(cx, a, b):
    return cx.emit("Not", [cx.emit("Equal", [a, b])])


@implement("torch", "rsqrt")
def _(cx, x):
    return 1.0 / torch.sqrt(x)


@implement("onnxrt", "rsqrt")
def _(cx, x):
    return cx.emit("Reciprocal", [cx.emit("Sqrt", [x])])


@implement("tvm", "reciprocal")
def _(c, x):
    return R.divide(c.const(1, c.in_type(0).dtype), x)


@implement("torch", "silu")
def _(cx, x):
    return x * torch.sigmoid(x)


@implement("onnxrt", "silu")
def _(cx, x):
    return cx.emit("Mul", [x, cx.emit("Sigmoid", [x])])


# -- logical_and, logical_or, logical_not ---------------------------------------------------------------


def _tvm_bool(c, x, i: int):
    dt = c.in_type(i).dtype
    return x if dt == "bool" else c.emit(R.not_equal(x, c.const(0, dt)))


@implement("tvm", "logical_and", "logical_or")
def _(c, a, b):
    return (R.logical_and if c.node.op == "logical_and" else R.logical_or)(_tvm_bool(c, a, 0), _tvm_bool(c, b, 1))


def _isnan_infer(ts, attrs):
    float_only(ts[0], "isnan")
    return [TensorType(ts[0].shape, "bool")]


@defop("isnan", _isnan_infer, kind="elementwise")
def isnan(x):
    """x is NaN. Its own op because compilers may fold the idiom x != x to false (TVM's LLVM build does)."""
    return np.isnan(x)


@isnan.torch
def _(cx, x):
    return torch.isnan(x)


@isnan.onnxrt
def _(cx, x):
    return cx.emit("IsNaN", [x])


@isnan.tvm
def _(c, x):
    return R.isnan(x)


@defop("logical_not", lambda ts, a: [TensorType(ts[0].shape, "bool")], kind="elementwise")
def logical_not(x):
    """not x (zero is false)"""
    return np.logical_not(x)


@logical_not.torch
def _(cx, x):
    return torch.logical_not(x)


@logical_not.onnxrt
def _(cx, x):
    return cx.emit("Not", [x])


@logical_not.tvm
def _(c, x):
    return R.logical_not(_tvm_bool(c, x, 0))


# -- div -----------------------------------------------------------------------------------------------


def _div_infer(ts, attrs):
    if attrs["rounding"] not in ("floor", "trunc"):
        raise OpError(f"div: rounding must be 'floor' or 'trunc', not {attrs['rounding']!r}")
    return _binary_infer()(ts, attrs)


@defop("div", _div_infer, num_inputs=(2, 2), kind="elementwise", attrs={"rounding": ("str", "floor")})
def div(a, b, rounding="floor"):
    """True division for floats; for integers, floor division (torch, numpy) or, with rounding="trunc",
    division rounding toward zero (ONNX, C)."""
    if not np.issubdtype(a.dtype, np.integer):
        return np.divide(a, b)
    with np.errstate(divide="ignore"):
        q = np.floor_divide(a, b)
    if rounding == "trunc":  # floor differs from trunc where the quotient is negative and inexact
        q = q + ((a - q * b != 0) & ((a < 0) != (b < 0)) & (b != 0)).astype(q.dtype)
    return q


@div.torch
def _(cx, a, b, rounding="floor"):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode=rounding)


@div.onnxrt
def _(cx, a, b, rounding="floor"):
    if not is_int(cx.node.inputs[0].dtype) or rounding == "trunc":
        return cx.emit("Div", [a, b])  # ONNX's integer Div truncates
    # floor(a/b) = (a - mod(a, b)) / b with Python-style Mod
    return cx.emit("Div", [cx.emit("Sub", [a, cx.emit("Mod", [a, b], fmod=0)]), b])


@div.tvm
def _(c, a, b, rounding="floor"):
    dt = c.in_type(0).dtype
    if is_float(dt):
        return R.divide(a, b)
    # numpy gives 0 for integer division by zero; the CPU would trap (SIGFPE), so guard it
    zero, one = c.const(0, dt), c.const(1, dt)
    bz = c.emit(R.equal(b, zero))
    safe = c.emit(R.where(bz, c.emit(R.broadcast_to(one, c.dims.shape(c.in_type(1).shape))), b))
    if rounding == "trunc" and not dt.startswith("uint"):  # |a| // |b| with the quotient's sign (unsigned: floor)
        q = c.emit(R.floor_divide(c.emit(R.abs(a)), c.emit(R.abs(safe))))
        q = c.emit(R.multiply(q, c.emit(R.multiply(c.emit(R.sign(a)), c.emit(R.sign(safe))))))
    else:
        q = c.emit(R.floor_divide(a, safe))
    return R.where(bz, zero, q)


# -- where ---------------------------------------------------------------------------------------------


def _where_infer(ts, attrs):
    cond, a, b = ts
    if cond.dtype != "bool":
        raise OpError(f"where: condition must be bool, got {cond.dtype}")
    dt = same_dtype([a, b], "where")
    return [TensorType(broadcast_shapes(broadcast_shapes(cond.shape, a.shape), b.shape), dt)]


@defop("where", _where_infer, num_inputs=(3, 3), kind="elementwise")
def where(cond, a, b):
    """a where cond is true, else b (broadcasting all three)."""
    return np.where(cond, a, b)


@where.torch
def _(cx, cond, a, b):
    return torch.where(cond, a, b)


@where.onnxrt
def _(cx, cond, a, b):
    return cx.emit("Where", [cond, a, b])


@where.tvm
def _(c, cond, a, b):
    return R.where(cond, a, b)


# -- relu, gelu ----------------------------------------------------------------------------------------


@defop("relu", _unary_infer(False), kind="elementwise")
def relu(x):
    """max(x, 0); relu(NaN) is NaN."""
    return np.maximum(x, 0).astype(x.dtype)


@relu.torch
def _(cx, x):
    return torch.relu(x)


@relu.onnxrt
def _(cx, x):
    # ONNX Runtime's Relu kernels are float/int8/int32 only: max(x, 0) for other integers
    dt = cx.node.inputs[0].dtype
    if is_int(dt):
        return onnx_minmax(cx, "Max", x, cx.const(0, dt, "zero"), dt)
    return cx.emit("Relu", [x])


def tvm_relu(c, x, dtype: str):
    zero = c.const(0, dtype)
    if not is_float(dtype):
        return R.maximum(x, zero)
    return R.where(c.emit(R.less(x, zero)), zero, x)  # relu(NaN) = NaN


@relu.tvm
def _(c, x):
    return tvm_relu(c, x, c.in_type(0).dtype)


@defop("gelu", _unary_infer(), attrs={"approximate": ("str", "none")}, kind="elementwise")
def gelu(x, approximate="none"):
    """0.5 x (1 + erf(x / sqrt 2)); with approximate="tanh", 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return gelu_ref(x, approximate)


def torch_gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


@gelu.torch
def _(cx, x, approximate="none"):
    return torch_gelu(x, approximate)


@gelu.onnxrt
def _(cx, x, approximate="none"):
    return cx.emit("Gelu", [x], approximate=approximate)


def tvm_gelu_erf(c, x, dtype: str):
    """0.5 x (1 + erf(x / sqrt 2)) from Relax primitives, so FastMathTransform can reach the erf."""
    e = c.emit(R.erf(c.emit(R.multiply(x, c.const(1.0 / math.sqrt(2.0), dtype)))))
    return R.multiply(x, c.emit(R.add(c.const(0.5, dtype), c.emit(R.multiply(e, c.const(0.5, dtype))))))


def tvm_gelu_tanh(c, x, dtype: str):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) from Relax primitives."""
    x3 = c.emit(R.multiply(c.emit(R.multiply(x, x)), x))
    inner = c.emit(R.add(x, c.emit(R.multiply(x3, c.const(0.044715, dtype)))))
    t = c.emit(R.tanh(c.emit(R.multiply(inner, c.const(math.sqrt(2.0 / math.pi), dtype)))))
    return R.multiply(c.emit(R.multiply(x, c.const(0.5, dtype))), c.emit(R.add(t, c.const(1.0, dtype))))


@gelu.tvm
def _(c, x, approximate="none"):
    dt = c.in_type(0).dtype
    return tvm_gelu_tanh(c, x, dt) if approximate == "tanh" else tvm_gelu_erf(c, x, dt)


# -- clamp ---------------------------------------------------------------------------------------------


@defop(
    "clamp",
    _unary_infer(False),
    attrs={"min": ("optional_float", None), "max": ("optional_float", None)},
    kind="elementwise",
)
def clamp(x, min=None, max=None):
    """x limited to [min, max] (either bound may be absent); a NaN stays NaN."""
    return np.clip(x, min, max)


@clamp.torch
def _(cx, x, min=None, max=None):
    return torch.clamp(x, min, max) if (min is not None or max is not None) else x


@clamp.onnxrt
def _(cx, x, min=None, max=None):
    dt = cx.node.inputs[0].dtype
    lo = None if min is None else cx.const(min, dt, "min")
    hi = None if max is None else cx.const(max, dt, "max")
    if lo and hi:
        return cx.emit("Clip", [x, lo, hi])
    if lo or hi:  # not Clip: its missing bound defaults to the dtype's finite limit, which clips +-Inf
        return onnx_minmax(cx, "Max" if lo else "Min", x, lo or hi, dt)
    return cx.emit("Identity", [x])


@clamp.tvm
def _(c, x, min=None, max=None):
    dt = c.in_type(0).dtype
    if min is not None:  # compare + select keeps a NaN (see tvm_maximum)
        lo = c.const(min if is_float(dt) else int(min), dt)
        x = c.emit(R.where(c.emit(R.less(x, lo)), lo, x))
    if max is not None:
        hi = c.const(max if is_float(dt) else int(max), dt)
        x = c.emit(R.where(c.emit(R.greater(x, hi)), hi, x))
    return x


# -- cast ----------------------------------------------------------------------------------------------


@defop(
    "cast",
    lambda ts, a: [TensorType(ts[0].shape, a["dtype"])],
    attrs={"dtype": ("dtype", REQUIRED)},
    kind="elementwise",
)
def cast(x, dtype):
    """x converted to ``dtype`` (to bool: nonzero is True)."""
    return x.astype(dtype)


@cast.torch
def _(cx, x, dtype):
    return x.to(_torch_dtypes.TORCH_DTYPES[dtype])


@cast.onnxrt
def _(cx, x, dtype):
    return cx.emit("Cast", [x], to=onnx_dtype(dtype))


@cast.tvm
def _(c, x, dtype):
    src = c.in_type(0).dtype
    if src == dtype:
        return x
    if dtype == "bool":  # numpy: nonzero -> True (a plain float->i1 conversion would truncate 0.5 to False)
        return R.not_equal(x, c.const(0, src))
    return R.astype(x, dtype)


# ---------------------------------------------------------------------------------------------------
# activations of the fused ops
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """An activation a fused op applies to its result (``act=`` of linear_act, qlinear, ...), on every
    executor. Calling it applies the numpy reference, so ``ACTIVATIONS[act](y)`` is the oracle."""

    ref: Callable[[np.ndarray], np.ndarray]  # numpy
    torch: Callable[[Any], Any]  # fn(y) -> tensor
    onnx: Callable[..., str]  # fn(cx, y, out=None) -> ONNX value name (``out`` when given)
    tvm: Callable[[Any, Any], Any]  # fn(c, y) -> Relax expr; y has the dtype of the node's output

    def __call__(self, y):
        return self.ref(y)


ACTIVATIONS: dict[str, Activation] = {
    "none": Activation(
        lambda y: y, lambda y: y, lambda cx, y, out=None: cx.emit("Identity", [y], out=out), lambda c, y: y
    ),
    "relu": Activation(
        lambda y: np.maximum(y, 0),
        lambda y: torch.relu(y),
        lambda cx, y, out=None: cx.emit("Relu", [y], out=out),
        lambda c, y: tvm_relu(c, y, c.out_type().dtype),
    ),
    "gelu": Activation(
        lambda y: gelu_ref(y, "none"),
        lambda y: torch_gelu(y),
        lambda cx, y, out=None: cx.emit("Gelu", [y], out=out, approximate="none"),
        lambda c, y: tvm_gelu_erf(c, y, c.out_type().dtype),
    ),
    "gelu_tanh": Activation(
        lambda y: gelu_ref(y, "tanh"),
        lambda y: torch_gelu(y, "tanh"),
        lambda cx, y, out=None: cx.emit("Gelu", [y], out=out, approximate="tanh"),
        lambda c, y: tvm_gelu_tanh(c, y, c.out_type().dtype),
    ),
    "silu": Activation(
        lambda y: y * sigmoid_ref(y),
        lambda y: y * torch.sigmoid(y),
        lambda cx, y, out=None: cx.emit("Mul", [y, cx.emit("Sigmoid", [y])], out=out),
        lambda c, y: R.nn.silu(y),
    ),
}


# -- hardswish, hardsigmoid (kept whole: ONNX Runtime has fused kernels for both) ------------------------


def hardsigmoid_ref(x):
    return (np.clip(x + 3, 0, 6) / 6).astype(x.dtype)


@defop("hardsigmoid", _unary_infer(), kind="elementwise")
def hardsigmoid(x):
    """relu6(x + 3) / 6 (torch.nn.Hardsigmoid)."""
    return hardsigmoid_ref(x)


@defop("hardswish", _unary_infer(), kind="elementwise")
def hardswish(x):
    """x * relu6(x + 3) / 6 (torch.nn.Hardswish, MobileNetV3's activation)."""
    return x * hardsigmoid_ref(x)


@hardsigmoid.torch
def _(cx, x):
    return torch.nn.functional.hardsigmoid(x)


@hardswish.torch
def _(cx, x):
    return torch.nn.functional.hardswish(x)


@hardsigmoid.onnxrt
def _(cx, x):
    return cx.emit("HardSigmoid", [x], alpha=1 / 6, beta=0.5)


@hardswish.onnxrt
def _(cx, x):
    return cx.emit("HardSwish", [x])


def tvm_hardsigmoid(c, x, dtype: str):
    """clip(x + 3, 0, 6) / 6 as one Relax expression chain (fuses into the neighbouring elementwise kernel);
    the clip keeps a NaN, as numpy, torch and ONNX Runtime do (plain Relax max/min would make it 0)."""
    y = c.emit(R.add(x, c.const(3, dtype)))
    y = c.emit(tvm_minimum(c, c.emit(tvm_maximum(c, y, c.const(0, dtype), dtype)), c.const(6, dtype), dtype))
    return R.multiply(y, c.const(1 / 6, dtype))


@hardsigmoid.tvm
def _(c, x):
    return tvm_hardsigmoid(c, x, c.in_type(0).dtype)


@hardswish.tvm
def _(c, x):
    return R.multiply(x, c.emit(tvm_hardsigmoid(c, x, c.in_type(0).dtype)))
