"""PyTorch frontend: ``torch.export`` -> ATen graph -> nnforge IR.

The model is exported, decomposed down to the ATen ops in ``ATEN_OPS`` (ops we map keep their
high-level form, e.g. ``aten.linear`` or ``aten.scaled_dot_product_attention``; everything else
torch can decompose is decomposed), then each fx node is converted by a small function from
the table. Symbolic sizes become dim strings named after the user's ``torch.export.Dim``s.

To map another ATen op, add ``overload: converter`` to ``ATEN_OPS``. A converter gets the node's
arguments already converted (tensors -> IR Values, SymInts -> dims) and returns a Value (a list
for multi-output ops); it raises ``_Unsupported`` for an argument combination it cannot map, and
the op is then reported with its source line like any unmapped op. Being in the table also stops
torch from decomposing the op. Every converted value is checked against torch's own shape/dtype.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import os
import re
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils import _pytree as pytree

from ..errors import NnforgeError, UnsupportedOpError
from ..ir import Graph, TensorType, Value, symbols
from ..ir.registry import OpError
from ..ops.shape import BIG

aten = torch.ops.aten

__all__ = ["import_torch", "ATEN_OPS", "TorchImportError"]


class TorchImportError(NnforgeError):
    """The exported program could not be turned into IR (names the ATen op and source line)."""


class _Unsupported(Exception):
    """A converter cannot take this particular call (an argument combination we do not map)."""


_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.complex64: "complex64",  # only torch_op nodes take or give complex values (see _complex)
    torch.complex128: "complex128",
}


def _dtype(dt: torch.dtype) -> str:
    if dt not in _DTYPES:
        raise _Unsupported(f"dtype {dt}")
    return _DTYPES[dt]


# ---------------------------------------------------------------------------------------
# symbolic sizes: torch's s0, s77... -> the user's Dim names
# ---------------------------------------------------------------------------------------


def _floor_div(a, b):
    return sympy.floor(a / b)


# torch's own sympy functions, rewritten into ones nnforge.ir.symbols can print and parse back
_SYMPY_FUNCS: dict[str, Callable] = {
    "FloorDiv": _floor_div,
    "CleanDiv": lambda a, b: a / b,
    "IntTrueDiv": lambda a, b: a / b,
    "PythonMod": sympy.Mod,
    "Mod": sympy.Mod,
    "Max": sympy.Max,
    "Min": sympy.Min,
    "floor": sympy.floor,
    "FloorToInt": sympy.floor,
    "CeilDiv": lambda a, b: -_floor_div(-a, b),
}


class _SymbolNames:
    """Translates torch SymInts into IR dims, naming symbols after the user's Dims."""

    def __init__(self):
        self.names: dict[str, str] = {}  # torch symbol name -> IR symbol name
        self._cache: dict[Any, Any] = {}

    def bind(self, expr, name: str | None) -> None:
        """Name the torch symbol behind one input axis (the first name given wins)."""
        free = list(getattr(expr, "free_symbols", ()))
        if (
            name
            and name.isidentifier()
            and len(free) == 1
            and free[0].name not in self.names
            and name not in self.names.values()
        ):
            self.names[free[0].name] = name

    def _translate(self, e):
        if e.is_Symbol:
            return sympy.Symbol(self.names.setdefault(e.name, e.name), integer=True, positive=True)
        if e.is_Number:
            return e
        args = [self._translate(a) for a in e.args]
        fn = _SYMPY_FUNCS.get(type(e).__name__)
        if fn is not None:
            return fn(*args)
        if e.func in (sympy.Add, sympy.Mul, sympy.Pow):
            return e.func(*args)
        raise _Unsupported(f"symbolic size {e} (uses {type(e).__name__})")

    def dim(self, v) -> symbols.Dim:
        """IR dim (int or expression string) of an int or SymInt."""
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
        if not isinstance(v, torch.SymInt):
            raise _Unsupported(f"size value {v!r}")
        expr = v.node.expr
        if expr not in self._cache:
            if expr.is_Integer:
                self._cache[expr] = int(expr)
            elif free_unbacked_symbols(expr):  # e.g. the length of nonzero(): data-dependent
                raise _Unsupported(f"data-dependent size {expr}")
            else:
                self._cache[expr] = symbols.from_sympy(self._translate(expr))
        return self._cache[expr]

    def shape(self, t: torch.Tensor) -> tuple:
        return tuple(self.dim(d) for d in t.shape)


def _input_dim_specs(model, example_inputs, dynamic_shapes) -> list:
    """Per user-input leaf (pytree order, as torch.export flattens), its per-axis Dim spec or None."""
    if dynamic_shapes is None:
        return [None] * len(pytree.tree_leaves(example_inputs))
    if isinstance(dynamic_shapes, dict):
        try:
            bound = inspect.signature(model.forward).bind(*example_inputs).arguments
        except TypeError:
            return []
        per_arg = [dynamic_shapes.get(k) for k in bound]
    else:
        per_arg = list(dynamic_shapes)
    out: list = []
    for arg, spec in zip(example_inputs, per_arg):
        out += _pair_leaves(arg, spec)
    return out


def _pair_leaves(arg, spec) -> list:
    if arg is None:  # pytree: None has no leaves
        return []
    if isinstance(arg, (list, tuple)):
        specs = spec if isinstance(spec, (list, tuple)) else [None] * len(arg)
        return [s for a, sp in zip(arg, specs) for s in _pair_leaves(a, sp)]
    if isinstance(arg, dict):
        specs = spec if isinstance(spec, dict) else {}
        return [s for k, a in arg.items() for s in _pair_leaves(a, specs.get(k))]
    return [spec]


def _axis_spec(spec, axis: int):
    if isinstance(spec, dict):
        return spec.get(axis)
    if isinstance(spec, (list, tuple)) and axis < len(spec):
        return spec[axis]
    return None


# ---------------------------------------------------------------------------------------
# source locations
# ---------------------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def _source(node: torch.fx.Node) -> str:
    """'file.py:LINE in func' of the innermost frame in the user's code (not torch's)."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR) and not f[0].startswith("<")]
    if not user:
        return ""
    path, line, func = user[-1]
    return f"{os.path.basename(path)}:{line} in {func}"


def _op_name(target) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------
# per-node conversion context
# ---------------------------------------------------------------------------------------


class _Ctx:
    """What a converter sees: the graph under construction and the fx node being converted."""

    def __init__(self, g: Graph, syms: _SymbolNames, consts: dict):
        self.g, self.syms, self._consts = g, syms, consts
        self.node: torch.fx.Node | None = None
        self.source = ""

    # -- building ---------------------------------------------------------------------
    def op(self, op: str, *inputs: Value | None, **attrs) -> Value:
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # absent optional trailing inputs (layer_norm without bias)
            inputs.pop()
        return self.g.add_node(op, inputs, attrs, name=self.node.name, source=self.source).output

    def const(self, value, dtype: str) -> Value:
        """A 0-d constant, shared between nodes (scalar operands repeat a lot: scales, eps, -inf)."""
        key = (repr(value), dtype)
        if key not in self._consts:
            self._consts[key] = self.g.add_constant(np.asarray(value, dtype=dtype), name="scalar")
        return self._consts[key]

    def cast(self, v: Value, dtype: str) -> Value:
        return v if v.dtype == dtype else self.op("cast", v, dtype=dtype)

    def tensor(self, v, dtype: str) -> Value:
        """Tensor operand of the given dtype: casts a Value, makes a constant of a Python scalar."""
        if isinstance(v, Value):
            return self.cast(v, dtype)
        if isinstance(v, (bool, int, float)):
            return self.const(v, dtype)
        raise _Unsupported(f"operand {v!r} (a symbolic size used as a tensor value)")

    # -- what torch says about the node's result ---------------------------------------
    @property
    def val(self):
        return self.node.meta.get("val")

    @property
    def out_dtype(self) -> str:
        return _dtype(self.val.dtype)

    @property
    def out_shape(self) -> tuple:
        return self.syms.shape(self.val)

    def result_type(self, a, b) -> str:
        """torch's type promotion of two original operands (tensors keep their rank: 0-d ranks lower)."""

        def proxy(x):
            if isinstance(x, torch.fx.Node):
                v = x.meta.get("val")
                return torch.empty([1] * v.dim(), dtype=v.dtype) if isinstance(v, torch.Tensor) else 1
            return x

        return _dtype(torch.result_type(proxy(a), proxy(b)))


def _ints(v) -> list[int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if any(isinstance(x, str) for x in v):
        raise _Unsupported(f"symbolic sizes {v} where only static ones are mapped")
    return [int(x) for x in v]


def _axis(axis: int, rank: int) -> int:
    return axis % rank if rank else 0


def _int_or_unsupported(v, what: str) -> int:
    if not isinstance(v, int):
        raise _Unsupported(f"symbolic {what} {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# converters: one small function per ATen op (or family), f(cx, *args, **kwargs) with args
# already converted (fx nodes -> Value / dim / list)
# ---------------------------------------------------------------------------------------


def _binary(ir_op: str, compare: bool = False):
    def convert(cx: _Ctx, a, b, alpha=1, **_):
        a0, b0 = cx.node.args[:2]
        dt = cx.result_type(a0, b0) if compare else cx.out_dtype
        b = _scaled(cx, b, alpha, dt)
        return cx.op(ir_op, cx.tensor(a, dt), cx.tensor(b, dt))

    return convert


def _scaled(cx: _Ctx, v, alpha, dt):
    """alpha * v for add/sub's alpha and addmm's alpha/beta (usually 1: nothing to do)."""
    if alpha == 1:
        return v
    return v * alpha if isinstance(v, (int, float)) else cx.op("mul", cx.tensor(v, dt), cx.const(alpha, dt))


def _pow_scalar(cx: _Ctx, a, b, **_):  # pow.Scalar: scalar ** tensor
    return cx.op("pow", cx.tensor(a, cx.out_dtype), cx.tensor(b, cx.out_dtype))


def _div_mode(cx: _Ctx, a, b, rounding_mode=None):
    dt = cx.out_dtype
    y = cx.op("div", cx.tensor(a, dt), cx.tensor(b, dt))
    if rounding_mode is None or (rounding_mode == "floor" and dt.startswith(("int", "uint"))):
        return y  # IR div is true division on floats, floor division on integers
    if rounding_mode == "floor":
        return cx.op("floor", y)
    raise _Unsupported(f"rounding_mode={rounding_mode!r}")


def _remainder(cx: _Ctx, a, b):
    """Python-style modulo, as torch: a - floor(a / b) * b (IR div floors on integers)."""
    dt = cx.out_dtype
    a, b = cx.tensor(a, dt), cx.tensor(b, dt)
    q = cx.op("div", a, b)
    q = q if dt.startswith(("int", "uint")) else cx.op("floor", q)
    return cx.op("sub", a, cx.op("mul", q, b))


def _boolean(ir_op: str):
    """logical_* (any input dtype, bool result) and bitwise_* on bool masks; bitwise ops on integers are not mapped."""

    def convert(cx: _Ctx, *args):
        if cx.out_dtype != "bool":
            raise _Unsupported("bitwise op on integers")
        return cx.op(ir_op, *[cx.tensor(a, "bool") for a in args])

    return convert


def _unary(ir_op: str):
    def convert(cx: _Ctx, x):
        return cx.op(ir_op, cx.cast(x, cx.out_dtype))  # exp(int) is float in torch

    return convert


def _gelu(cx: _Ctx, x, approximate="none"):
    return cx.op("gelu", x, approximate=approximate)


def _hardtanh(cx: _Ctx, x, min_val=-1.0, max_val=1.0):  # relu6 is hardtanh(0, 6)
    return cx.op("clamp", x, min=min_val, max=max_val)


def _leaky_relu(cx: _Ctx, x, negative_slope=0.01):
    return cx.op("where", cx.op("gt", x, cx.const(0, x.dtype)), x, cx.op("mul", x, cx.const(negative_slope, x.dtype)))


def _elu(cx: _Ctx, x, alpha=1.0, scale=1.0, input_scale=1.0):
    """scale * (x if x > 0 else alpha * (exp(x * input_scale) - 1)), as torch."""
    neg = cx.op("exp", cx.op("mul", x, cx.const(input_scale, x.dtype)))
    neg = cx.op("mul", cx.op("sub", neg, cx.const(1, x.dtype)), cx.const(alpha, x.dtype))
    y = cx.op("where", cx.op("gt", x, cx.const(0, x.dtype)), x, neg)
    return y if scale == 1 else cx.op("mul", y, cx.const(scale, x.dtype))


def _log1p(cx: _Ctx, x):  # log(1 + x): loses digits only for |x| < ~1e-7, far below our tolerances
    x = cx.cast(x, cx.out_dtype)
    return cx.op("log", cx.op("add", x, cx.const(1, x.dtype)))


def _identity(cx: _Ctx, x, *args, **kwargs):
    return x


def _drop(cx: _Ctx, *args, **kwargs):  # runtime asserts: torch.export already checked them at trace time
    return None


def _dropout(cx: _Ctx, x, p=0.5, train=False):
    if train and p > 0:
        raise _Unsupported("dropout in training mode")
    return x


def _sym_value(cx: _Ctx, *args, **kwargs):
    """sym_size / SymInt arithmetic: the node's value is its size expression, as a dim."""
    val = cx.val
    if isinstance(val, (torch.SymBool, bool)):  # only feeds _assert_scalar, which we drop
        return None
    return cx.syms.dim(val)


def _getitem(cx: _Ctx, seq, i):
    if seq[i] is None:
        raise _Unsupported(f"output {i} (training-only result)")
    return seq[i]


def _to_copy(cx: _Ctx, x, dtype=None, **_):
    return cx.cast(x, cx.out_dtype)


def _scalar_tensor(cx: _Ctx, value, **_):
    return cx.const(value, cx.out_dtype)


def _full(cx: _Ctx, size, value, **_):
    shape = cx.out_shape
    if not all(isinstance(d, int) for d in shape):
        raise _Unsupported("full() of a symbolic shape")
    return cx.g.add_constant(np.full(shape, value, dtype=cx.out_dtype), name=cx.node.name)


def _full_like(value=None):
    def convert(cx: _Ctx, x, *args, **kwargs):
        fill = value if value is not None else args[0] if args else kwargs["fill_value"]
        return cx.op("full_like", x, value=float(fill), dtype=cx.out_dtype)

    return convert


def _where(cx: _Ctx, cond, a, b):
    dt = cx.out_dtype
    return cx.op("where", cond, cx.tensor(a, dt), cx.tensor(b, dt))


def _masked_fill(cx: _Ctx, x, mask, value):
    return cx.op("where", mask, cx.tensor(value, x.dtype), x)


def _clamp(cx: _Ctx, x, min=None, max=None):
    x = cx.cast(x, cx.out_dtype)
    if isinstance(min, Value) or isinstance(max, Value):  # clamp.Tensor
        x = x if min is None else cx.op("maximum", x, cx.tensor(min, x.dtype))
        return x if max is None else cx.op("minimum", x, cx.tensor(max, x.dtype))
    for bound in (min, max):
        if bound is not None and not isinstance(bound, (int, float)):
            raise _Unsupported("symbolic clamp bound")
    return cx.op("clamp", x, min=min, max=max)


# -- reductions ---------------------------------------------------------------------------


def _reduce(ir_op: str):
    def convert(cx: _Ctx, x, dim=None, keepdim=False, dtype=None, **_):
        axes = None if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0) else _ints(dim)
        return cx.op(ir_op, cx.cast(x, cx.out_dtype), axes=axes, keepdims=bool(keepdim))

    return convert


def _sum_all(cx: _Ctx, x, dtype=None):
    return cx.op("reduce_sum", cx.cast(x, cx.out_dtype), axes=None, keepdims=False)


def _mean_all(cx: _Ctx, x, dtype=None):
    return cx.op("reduce_mean", cx.cast(x, cx.out_dtype), axes=None, keepdims=False)


def _argmax(cx: _Ctx, x, dim=None, keepdim=False):
    if dim is None:
        if keepdim:
            raise _Unsupported("argmax(dim=None, keepdim=True)")
        return cx.op("argmax", cx.op("reshape", x, shape=[-1]), axis=0)
    return cx.op("argmax", x, axis=dim, keepdims=bool(keepdim))


def _max_dim(cx: _Ctx, x, dim, keepdim=False):
    keep = bool(keepdim)
    return [cx.op("reduce_max", x, axes=[dim], keepdims=keep), cx.op("argmax", x, axis=dim, keepdims=keep)]


def _reduce_all(ir_op: str):  # x.max() / x.min(): over every axis
    def convert(cx: _Ctx, x):
        return cx.op(ir_op, x, axes=None, keepdims=False)

    return convert


def _vector_norm(cx: _Ctx, x, ord=2, dim=None, keepdim=False, dtype=None):
    """torch.linalg.vector_norm / x.norm() for ord 1 and 2 (F.normalize uses ord 2)."""
    axes = None if not dim else _ints(dim)
    x = cx.cast(x, cx.out_dtype)
    if ord == 1:
        return cx.op("reduce_sum", cx.op("abs", x), axes=axes, keepdims=bool(keepdim))
    if ord == 2:
        return cx.op("sqrt", cx.op("reduce_sum", cx.op("mul", x, x), axes=axes, keepdims=bool(keepdim)))
    raise _Unsupported(f"vector norm of order {ord}")


def _var(cx: _Ctx, x, dim=None, correction=None, keepdim=False):
    """mean((x - mean(x))^2) * n / (n - correction); correction defaults to 1 (unbiased)."""
    axes = None if not dim else _ints(dim)
    rank = len(x.shape)
    sizes = [x.shape[_axis(a, rank)] for a in (axes if axes is not None else range(rank))]
    if not all(isinstance(d, int) for d in sizes):
        raise _Unsupported("variance over a symbolic axis")
    n = math.prod(sizes)
    c = 1 if correction is None else correction
    d = cx.op("sub", x, cx.op("reduce_mean", x, axes=axes, keepdims=True))
    v = cx.op("reduce_mean", cx.op("mul", d, d), axes=axes, keepdims=bool(keepdim))
    return v if c == 0 else cx.op("mul", v, cx.const(n / (n - c) if n > c else float("nan"), x.dtype))


def _softmax(ir_op: str):
    def convert(cx: _Ctx, x, dim, *_, **__):  # half_to_float / dtype: the result dtype says it
        return cx.op(ir_op, cx.cast(x, cx.out_dtype), axis=dim)

    return convert


# -- normalisation, linear algebra, attention -------------------------------------------


def _layer_norm(cx: _Ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return cx.op("layer_norm", x, weight, bias, naxes=len(normalized_shape), eps=eps)


def _rms_norm(cx: _Ctx, x, normalized_shape, weight=None, eps=None):
    eps = float(torch.finfo(cx.val.dtype).eps) if eps is None else eps  # torch's default
    return cx.op("rms_norm", x, weight, naxes=len(normalized_shape), eps=eps)


def _bn_no_training(cx: _Ctx, x, weight, bias, mean, var, momentum, eps):
    """Inference batch norm; torch also returns (empty) saved statistics, only used by training."""
    return [cx.op("batch_norm", x, mean, var, weight, bias, eps=eps), None, None]


def _batch_norm(cx: _Ctx, x, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    if training or mean is None:
        raise _Unsupported("batch norm in training mode")
    return cx.op("batch_norm", x, mean, var, weight, bias, eps=eps)


def _linear(cx: _Ctx, x, weight, bias=None):
    if len(weight.shape) != 2:
        raise _Unsupported("linear with a 1-D weight")
    return cx.op("linear", x, weight, *([bias] if bias is not None else []))


def _matmul(cx: _Ctx, a, b):
    return cx.op("matmul", a, b)


def _addmm(cx: _Ctx, bias, a, b, beta=1, alpha=1):
    y = _scaled(cx, cx.op("matmul", a, b), alpha, a.dtype)
    return cx.op("add", y, _scaled(cx, bias, beta, a.dtype))


def _sdpa(cx: _Ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa:
        raise _Unsupported("enable_gqa=True")
    if attn_mask is not None and attn_mask.dtype != "bool":
        attn_mask = cx.cast(attn_mask, q.dtype)
    # dropout_p is ignored: inference graphs
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    return cx.op("sdpa", *inputs, is_causal=bool(is_causal), scale=scale)


# -- convolution and pooling --------------------------------------------------------------


def _conv2d(cx: _Ctx, x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    if isinstance(padding, str):  # conv2d.padding: "valid" or "same"
        padding = _same_padding(w.shape[2:], _pair(dilation)) if padding == "same" else [0, 0]
    return cx.op(
        "conv2d",
        x,
        w,
        *([bias] if bias is not None else []),
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
        groups=groups,
    )


def _pair(v) -> list[int]:
    v = _ints(v)
    return v if len(v) == 2 else [v[0], v[0]]


def _same_padding(kernel, dilation) -> list[int]:
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in totals):
        raise _Unsupported("padding='same' that needs asymmetric padding")
    return [t // 2 for t in totals]


def _convolution(cx: _Ctx, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    """aten.convolution (what conv1d decomposes into): 2-D directly, 1-D as a height-1 2-D conv."""
    if transposed:
        raise _Unsupported("transposed convolution")
    if len(x.shape) == 4:
        return _conv2d(cx, x, w, bias, stride, padding, dilation, groups)
    if len(x.shape) != 3:
        raise _Unsupported(f"{len(x.shape) - 2}-D convolution")
    x4, w4 = cx.op("unsqueeze", x, axes=[2]), cx.op("unsqueeze", w, axes=[2])
    y = _conv2d(cx, x4, w4, bias, [1, _ints(stride)[0]], [0, _ints(padding)[0]], [1, _ints(dilation)[0]], groups)
    return cx.op("squeeze", y, axes=[2])


def _max_pool2d(cx: _Ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return cx.op(
        "max_pool2d",
        x,
        kernel=_pair(kernel_size),
        stride=_pair(stride or kernel_size),
        padding=_pair(padding),
        dilation=_pair(dilation),
        ceil_mode=bool(ceil_mode),
    )


def _avg_pool2d(
    cx: _Ctx, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    if divisor_override is not None:
        raise _Unsupported("divisor_override")
    return cx.op(
        "avg_pool2d",
        x,
        kernel=_pair(kernel_size),
        stride=_pair(stride or kernel_size),
        padding=_pair(padding),
        ceil_mode=bool(ceil_mode),
        count_include_pad=bool(count_include_pad),
    )


def _adaptive_avg_pool2d(cx: _Ctx, x, output_size):
    return cx.op("adaptive_avg_pool2d", x, output_size=_pair(output_size))


# -- shape and data movement ------------------------------------------------------------------


def _reshape(cx: _Ctx, x, *args, **kwargs):
    """view / reshape / flatten / unflatten: torch already resolved the target shape (and any -1)."""
    return cx.op("reshape", x, shape=list(cx.out_shape))


def _expand(cx: _Ctx, x, size, implicit=False):
    return cx.op("expand", x, shape=list(cx.out_shape))


def _repeat(cx: _Ctx, x, repeats):
    """Tile: [d0, d1] -> [1, d0, 1, d1] -> expand to [r0, d0, r1, d1] -> reshape to [r0*d0, r1*d1]."""
    reps = list(repeats)  # may hold symbolic sizes: x.repeat(batch, 1, 1)
    shape = [1] * (len(reps) - len(x.shape)) + list(x.shape)
    interleaved = [d for pair in zip([1] * len(shape), shape) for d in pair]
    tiled = [d for pair in zip(reps, shape) for d in pair]
    y = cx.op("expand", cx.op("reshape", x, shape=interleaved), shape=tiled)
    return cx.op("reshape", y, shape=list(cx.out_shape))


def _permute(cx: _Ctx, x, dims):
    return cx.op("permute", x, perm=[_axis(d, len(x.shape)) for d in dims])


def _transpose(cx: _Ctx, x, d0, d1):
    perm = list(range(len(x.shape)))
    if perm:
        a, b = _axis(d0, len(perm)), _axis(d1, len(perm))
        perm[a], perm[b] = perm[b], perm[a]
    return cx.op("permute", x, perm=perm)


def _t(cx: _Ctx, x):
    return _transpose(cx, x, 0, 1) if len(x.shape) == 2 else x


def _cat(cx: _Ctx, tensors, dim=0):
    dt = cx.out_dtype
    return cx.op("concat", *[cx.cast(t, dt) for t in tensors], axis=dim)


def _unsqueeze(cx: _Ctx, x, dim):
    return cx.op("unsqueeze", x, axes=[dim])


def _squeeze(cx: _Ctx, x, dim=None):
    """torch squeezes only axes of size 1 (others are a no-op); symbolic sizes are never 1 in export."""
    rank = len(x.shape)
    axes = range(rank) if dim is None else [_axis(d, rank) for d in _ints(dim)]
    axes = [a for a in axes if x.shape[a] == 1]
    return cx.op("squeeze", x, axes=axes) if axes else x


def _slice(cx: _Ctx, x, dim=0, start=None, end=None, step=1):
    start = _int_or_unsupported(0 if start is None else start, "slice start")
    if end is None or (isinstance(end, int) and end >= BIG):
        end = BIG
    if start == 0 and end == BIG and step == 1:
        return x
    return cx.op("slice", x, axis=_axis(dim, len(x.shape)), start=start, end=end, step=step)


def _take(cx: _Ctx, x, axis: int, index: int) -> Value:
    """x[..., index, ...] along one axis: a slice of length 1, then drop the axis."""
    end = BIG if index == -1 else index + 1
    return cx.op("squeeze", cx.op("slice", x, axis=axis, start=index, end=end), axes=[axis])


def _select(cx: _Ctx, x, dim, index):
    return _take(cx, x, _axis(dim, len(x.shape)), _int_or_unsupported(index, "select index"))


def _unbind(cx: _Ctx, x, dim=0):
    axis = _axis(dim, len(x.shape))
    return [_take(cx, x, axis, i) for i in range(len(cx.val))]


def _split(cx: _Ctx, x, split_size, dim=0):
    """split / split_with_sizes: torch's result list gives each chunk's size."""
    axis, start, out = _axis(dim, len(x.shape)), 0, []
    sizes = [cx.syms.dim(t.shape[axis]) for t in cx.val]
    for i, size in enumerate(sizes):
        if not isinstance(size, int) and i < len(sizes) - 1:
            raise _Unsupported("split into chunks of symbolic size")
        end = start + size if isinstance(size, int) else BIG  # a symbolic last chunk runs to the end
        out.append(cx.op("slice", x, axis=axis, start=start, end=end))
        start = end
    return out


def _gather(cx: _Ctx, x, dim, index):
    return cx.op("gather", x, index, axis=_axis(dim, len(x.shape)))


def _embedding(cx: _Ctx, weight, indices, *args, **kwargs):
    return cx.op("gather", weight, indices, axis=0)


def _index(cx: _Ctx, x, indices):
    """x[i] / x[:, i] / x[i, :, j]: integer index tensors (None slots keep an axis whole), broadcast together."""
    given = [(axis, t) for axis, t in enumerate(indices) if t is not None]
    if any(t.dtype not in ("int64", "int32") for _, t in given):
        raise _Unsupported("indexing with a boolean mask (its result size depends on the data)")
    if len(given) == 1:  # one index tensor on one axis: numpy.take
        axis, idx = given[0]
        return cx.op("gather", x, idx, axis=axis)
    return cx.op("index", x, *[t for _, t in given], axes=[axis for axis, _ in given])


def _gather_elements(cx: _Ctx, x, dim, index, sparse_grad=False):
    return cx.op("gather_elements", x, index, axis=_axis(dim, len(x.shape)))


def _scatter(reduction: str):
    def convert(cx: _Ctx, x, dim, index, src):
        """scatter.src / scatter.value / scatter_add: src is read only where index has entries."""
        axis = _axis(dim, len(x.shape))
        if isinstance(src, Value):
            if tuple(src.shape) != tuple(index.shape):
                src = _crop_to(cx, src, index.shape)
        else:
            src = cx.op("expand", cx.const(src, x.dtype), shape=list(index.shape))
        return cx.op("scatter_elements", x, index, cx.cast(src, x.dtype), axis=axis, reduction=reduction)

    return convert


def _crop_to(cx: _Ctx, v: Value, shape) -> Value:
    for axis, (have, want) in enumerate(zip(v.shape, shape)):
        if have != want:
            if not isinstance(want, int):
                raise _Unsupported("scatter with a larger src of symbolic size")
            v = cx.op("slice", v, axis=axis, start=0, end=want)
    return v


def _cumsum(cx: _Ctx, x, dim, dtype=None):
    return cx.op("cumsum", cx.cast(x, cx.out_dtype), axis=_axis(dim, len(x.shape)))


def _topk(cx: _Ctx, x, k, dim=-1, largest=True, sorted=True):
    # unsorted topk may come back in any order; the sorted order is one of them
    node = cx.g.add_node(
        "topk",
        [x],
        {"k": _int_or_unsupported(k, "topk k"), "axis": _axis(dim, len(x.shape)), "largest": bool(largest)},
        name=cx.node.name,
        source=cx.source,
    )
    return list(node.outputs)


def _sort(cx: _Ctx, x, dim=-1, descending=False, stable=None):
    """A sort is a topk of the whole axis (stable: equal values keep their order)."""
    axis = _axis(dim, len(x.shape))
    return _topk(cx, x, _int_or_unsupported(x.shape[axis], "sort axis size"), axis, bool(descending))


def _sort_stable(cx: _Ctx, x, stable=None, dim=-1, descending=False):
    return _sort(cx, x, dim, descending)


def _constant_pad(cx: _Ctx, x, pad, value=0):
    """constant_pad_nd: torch's pads run from the last axis (begin, end pairs); negative pads crop."""
    pad = _ints(pad)
    rank = len(x.shape)
    begin, end = [0] * rank, [0] * rank
    for k in range(len(pad) // 2):
        begin[rank - 1 - k], end[rank - 1 - k] = pad[2 * k], pad[2 * k + 1]
    if not any(begin + end):
        return x
    if not isinstance(value, (int, float)):
        raise _Unsupported("a symbolic pad value")
    return cx.op("pad", x, pads=begin + end, value=float(value))


def _group_norm(cx: _Ctx, x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return cx.op("group_norm", x, weight, bias, num_groups=num_groups, eps=eps)


def _native_group_norm(cx: _Ctx, x, weight, bias, n, c, hxw, group, eps):
    """native_group_norm also returns the statistics, which only training uses."""
    return [_group_norm(cx, x, group, weight, bias, eps), None, None]


def _upsample(mode: str):
    def convert(cx: _Ctx, x, output_size=None, *args):
        """upsample_{nearest,bilinear}2d (.default and .vec): torch resolved the output size."""
        align = bool(args[0]) if mode == "linear" else False
        scales = [a for a in args[1 if mode == "linear" else 0 :] if a is not None]
        scales = [s for a in scales for s in (a if isinstance(a, (list, tuple)) else [a])]
        size = _ints(cx.out_shape[2:])
        if scales and any(d * s != o for d, s, o in zip(_ints(x.shape[2:]), scales, size)):
            raise _Unsupported("upsampling by a scale factor that does not give a whole output size")
        return cx.op("upsample2d", x, size=size, mode=mode, align_corners=align)

    return convert


def _arange(cx: _Ctx, *args, **kwargs):
    """arange(end) / arange(start, end) / arange(start, end, step), end may be a symbolic size."""
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    start, step = (_int_or_unsupported(_integral(v), "arange start/step") for v in (start, step))
    return cx.op("arange", start=start, end=_integral(end), step=step, dtype=cx.out_dtype)


def _integral(v):
    if isinstance(v, float):
        if not v.is_integer():
            raise _Unsupported("arange with fractional bounds")
        return int(v)
    return v


ATEN_OPS: dict[Any, Callable] = {
    # elementwise arithmetic (scalars become 0-d constants of the result dtype)
    **{
        getattr(aten, name).Tensor: _binary(ir)
        for name, ir in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div")]
    },
    **{
        getattr(aten, name).Scalar: _binary(ir)
        for name, ir in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div")]
    },
    aten.div.Tensor_mode: _div_mode,
    aten.pow.Tensor_Scalar: _binary("pow"),
    aten.pow.Tensor_Tensor: _binary("pow"),
    aten.pow.Scalar: _pow_scalar,
    aten.maximum.default: _binary("maximum"),
    aten.minimum.default: _binary("minimum"),
    **{getattr(aten, name).Tensor: _binary(name, compare=True) for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{getattr(aten, name).Scalar: _binary(name, compare=True) for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    aten.logical_and.default: _boolean("logical_and"),
    aten.logical_or.default: _boolean("logical_or"),
    aten.logical_not.default: _boolean("logical_not"),
    aten.bitwise_and.Tensor: _boolean("logical_and"),
    aten.bitwise_or.Tensor: _boolean("logical_or"),
    aten.bitwise_not.default: _boolean("logical_not"),
    aten.remainder.Scalar: _remainder,
    aten.remainder.Tensor: _remainder,
    aten.where.self: _where,
    aten.masked_fill.Scalar: _masked_fill,
    aten.masked_fill.Tensor: _masked_fill,
    aten.clamp.default: _clamp,
    aten.clamp.Tensor: _clamp,
    aten.clamp_min.default: lambda cx, x, m: _clamp(cx, x, min=m),
    aten.clamp_max.default: lambda cx, x, m: _clamp(cx, x, max=m),
    # unary
    **{
        getattr(aten, name).default: _unary(name)
        for name in (
            "relu",
            "silu",
            "sigmoid",
            "tanh",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "neg",
            "abs",
            "erf",
            "sin",
            "cos",
            "reciprocal",
            "floor",
            "ceil",
        )
    },
    aten.gelu.default: _gelu,
    aten.hardtanh.default: _hardtanh,
    aten.leaky_relu.default: _leaky_relu,
    aten.elu.default: _elu,
    aten.hardswish.default: _unary("hardswish"),  # kept whole: ONNX Runtime's HardSwish is one fused kernel
    aten.hardsigmoid.default: _unary("hardsigmoid"),
    aten.log1p.default: _log1p,
    aten._to_copy.default: _to_copy,
    # reductions and normalisation
    aten.sum.dim_IntList: _reduce("reduce_sum"),
    aten.sum.default: _sum_all,
    aten.mean.dim: _reduce("reduce_mean"),
    aten.mean.default: _mean_all,
    aten.amax.default: _reduce("reduce_max"),
    aten.amin.default: _reduce("reduce_min"),
    aten.argmax.default: _argmax,
    aten.max.dim: _max_dim,
    aten.max.default: _reduce_all("reduce_max"),
    aten.min.default: _reduce_all("reduce_min"),
    aten.linalg_vector_norm.default: _vector_norm,
    aten.var.correction: _var,
    aten.softmax.int: _softmax("softmax"),
    aten._softmax.default: _softmax("softmax"),
    aten.log_softmax.int: _softmax("log_softmax"),
    aten._log_softmax.default: _softmax("log_softmax"),
    aten.layer_norm.default: _layer_norm,
    aten.rms_norm.default: _rms_norm,
    aten._native_batch_norm_legit_no_training.default: _bn_no_training,
    aten.batch_norm.default: _batch_norm,
    aten.group_norm.default: _group_norm,
    aten.native_group_norm.default: _native_group_norm,
    # linear algebra, attention, convolution
    aten.linear.default: _linear,
    aten.matmul.default: _matmul,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.addmm.default: _addmm,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.conv2d.default: _conv2d,
    aten.conv2d.padding: _conv2d,
    aten.convolution.default: _convolution,
    aten.max_pool2d.default: _max_pool2d,
    aten.avg_pool2d.default: _avg_pool2d,
    aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d,
    # shapes and data movement
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.reshape.default: _reshape,
    aten.flatten.using_ints: _reshape,
    aten.unflatten.int: _reshape,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _t,
    aten.expand.default: _expand,
    aten.repeat.default: _repeat,
    aten.cat.default: _cat,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.unbind.int: _unbind,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.index_select.default: _gather,
    aten.index.Tensor: _index,
    aten.gather.default: _gather_elements,
    aten.scatter.src: _scatter("none"),
    aten.scatter.value: _scatter("none"),
    aten.scatter_add.default: _scatter("add"),
    aten.cumsum.default: _cumsum,
    aten.topk.default: _topk,
    aten.sort.default: _sort,
    aten.sort.stable: _sort_stable,
    aten.constant_pad_nd.default: _constant_pad,
    aten.upsample_nearest2d.default: _upsample("nearest"),
    aten.upsample_nearest2d.vec: _upsample("nearest"),
    aten.upsample_bilinear2d.default: _upsample("linear"),
    aten.upsample_bilinear2d.vec: _upsample("linear"),
    aten.embedding.default: _embedding,
    # tensor creation
    aten.arange.default: _arange,
    aten.arange.start: _arange,
    aten.arange.start_step: _arange,
    aten.zeros_like.default: _full_like(0),
    aten.ones_like.default: _full_like(1),
    aten.full_like.default: _full_like(),
    aten.empty_like.default: _full_like(0),
    aten.scalar_tensor.default: _scalar_tensor,
    aten.full.default: _full,
    # no-ops in an inference graph
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.lift_fresh_copy.default: _identity,
    aten.contiguous.default: _identity,
    aten.dropout.default: _dropout,
    aten._assert_tensor_metadata.default: _drop,
    aten._assert_scalar.default: _drop,
    aten.sym_constrain_range_for_size.default: _drop,
    aten.sym_constrain_range.default: _drop,
    # sizes (SymInts) and multi-output plumbing
    aten.sym_size.int: _sym_value,
    aten.sym_numel.default: _sym_value,
    **{
        fn: _sym_value
        for fn in (
            operator.add,
            operator.sub,
            operator.mul,
            operator.floordiv,
            operator.mod,
            operator.neg,
            operator.eq,
            operator.ne,
            operator.lt,
            operator.le,
            operator.gt,
            operator.ge,
            operator.and_,
            operator.or_,
            torch.sym_max,
            torch.sym_min,
            torch.sym_not,
        )
    },
    operator.getitem: _getitem,
}


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------


def _decomposition_table():
    """torch's default decompositions, minus the ops we map directly (those stay whole)."""
    table = torch.export.default_decompositions()
    for op in ATEN_OPS:
        if isinstance(op, torch._ops.OpOverload):
            table.pop(op, None)
    return table


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Export the inference behaviour (as torch.onnx.export does), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _export(model, example_inputs, dynamic_shapes):
    with warnings.catch_warnings():
        # torch 2.13 warns about its own pytree internals on every export; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        try:
            with _eval_mode(model):
                ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
        except Exception as e:  # torch's own message is the useful part (guards, unsupported Python)
            raise TorchImportError(f"torch.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e
        return ep.run_decompositions(_decomposition_table())


def _convert_args(env: dict, a):
    if isinstance(a, torch.fx.Node):
        return env.get(a, _Missing)  # get_attr nodes (subgraphs of cond/map) are never converted
    if isinstance(a, (list, tuple)):
        return type(a)(_convert_args(env, x) for x in a)
    return a


class _Missing:
    """Stands for the result of a node that could not be converted (its users are skipped)."""


def _has_missing(v) -> bool:
    return v is _Missing or (isinstance(v, (list, tuple)) and any(_has_missing(x) for x in v))


def _check_type(v: Value, fake, syms: _SymbolNames, what: str) -> None:
    """The converted value must have the type torch computed: catches mapping bugs at the node that has them."""
    want = TensorType(syms.shape(fake), _dtype(fake.dtype))
    same = (
        v.dtype == want.dtype
        and v.type.rank == want.rank
        and all(a == b or symbols.dims_equal(a, b) for a, b in zip(v.shape, want.shape))
    )
    if not same:
        raise TorchImportError(f"{what}: converted to {v.type}, but torch says {want}")


def _name_symbols(syms: _SymbolNames, vals: list, input_names: list[str], dim_specs: list) -> None:
    """Before any size is translated: symbols take the user's Dim names ("batch"), else "<input>_<axis>"."""
    axes = [
        (f"{name}_{axis}", d.node.expr, _axis_spec(spec, axis))
        for val, name, spec in zip(vals, input_names, dim_specs)
        if isinstance(val, torch.Tensor)
        for axis, d in enumerate(val.shape)
        if isinstance(d, torch.SymInt)
    ]
    for _, expr, dim in axes:  # a derived Dim (2*batch) names its root
        syms.bind(expr, getattr(getattr(dim, "root", dim), "__name__", None))
    for fallback, expr, _ in axes:  # Dim.AUTO / Dim.DYNAMIC carry no name; only an axis that *is* the symbol
        if expr.is_Symbol:
            syms.bind(expr, fallback)


def _user_input_names(ep, input_names) -> list[str]:
    """The user's names, else torch's placeholder names, which are forward()'s parameter names."""
    placeholders = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if input_names is None:
        return placeholders
    if len(input_names) != len(placeholders):
        raise TorchImportError(
            f"input_names has {len(input_names)} name(s) but the model takes "
            f"{len(placeholders)} input(s): {placeholders}"
        )
    return list(input_names)


def _constant_array(t: torch.Tensor, fqn: str) -> np.ndarray:
    if t.dtype not in _DTYPES or t.dtype == torch.bfloat16:
        raise TorchImportError(f"parameter/buffer {fqn!r} has dtype {t.dtype}, which has no numpy equivalent here")
    return t.detach().cpu().contiguous().numpy().copy()  # a copy: the graph must not change with the model


def _add_inputs(g: Graph, ep, syms: _SymbolNames, model, example_inputs, dynamic_shapes, input_names) -> dict:
    """Graph inputs for user tensors; constants for parameters, buffers and lifted tensors."""
    nodes = {n.name: n for n in ep.graph.nodes}
    user_specs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    names = _user_input_names(ep, input_names)
    dim_specs = _input_dim_specs(model, example_inputs, dynamic_shapes)
    dim_specs = dim_specs if len(dim_specs) == len(user_specs) else [None] * len(user_specs)
    _name_symbols(syms, [nodes[s.arg.name].meta.get("val") for s in user_specs], names, dim_specs)

    env: dict[torch.fx.Node, Any] = {}
    names_iter = iter(names)
    for spec in ep.graph_signature.input_specs:
        node, kind = nodes[spec.arg.name], spec.kind.name
        if kind == "USER_INPUT":
            env[node] = _user_input(g, syms, next(names_iter), node.meta.get("val"))
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            t = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            env[node] = g.add_constant(_constant_array(t, spec.target), name=spec.target)
        else:
            raise TorchImportError(f"input {spec.arg.name!r} of kind {kind} is not supported")
    return env


def _user_input(g: Graph, syms: _SymbolNames, name: str, val):
    if isinstance(val, torch.Tensor):
        try:
            return g.add_input(name, TensorType(syms.shape(val), _dtype(val.dtype)))
        except _Unsupported as e:
            raise TorchImportError(f"input {name!r}: {e}") from None
    if val is None or isinstance(val, (bool, int, float, str)):  # torch.export specialised the program on it
        return val
    raise TorchImportError(f"input {name!r}: a {type(val).__name__} input is not supported (only tensors)")


def _complex(node: torch.fx.Node) -> bool:
    """Whether the node takes or gives a complex tensor: no IR op does, so such a node stays a torch_op
    (``torch.fft.rfft(x).abs()`` runs on torch; the complex value never leaves the torch partition)."""
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    vals = [t for v in vals for t in (v if isinstance(v, (list, tuple)) else [v])]
    return any(isinstance(t, torch.Tensor) and t.is_complex() for t in vals)


def _convert_nodes(g: Graph, ep, env: dict, syms: _SymbolNames, opaque: bool = False) -> list[tuple[str, str]]:
    """Convert every call node through ATEN_OPS; returns the (op, source) pairs that could not be.

    With ``opaque``, an op that has no converter (or whose converter cannot take this call) is kept
    as a ``torch_op`` node the torch executor runs, when its arguments and results allow it.
    """
    cx = _Ctx(g, syms, {})
    unsupported: list[tuple[str, str]] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        cx.node, cx.source = node, _source(node)
        where = f"{_op_name(node.target)} at {cx.source or node.name}"
        fn = ATEN_OPS.get(node.target)
        args, kwargs = _convert_args(env, node.args), _convert_args(env, dict(node.kwargs))
        env[node] = _Missing
        if _has_missing(args) or _has_missing(list(kwargs.values())):
            if fn is None and (_op_name(node.target), cx.source) not in unsupported:
                unsupported.append((_op_name(node.target), cx.source))
            continue  # a producer was unsupported: only the producer is blamed
        try:
            if fn is None:
                raise _Unsupported("")
            if _complex(node):
                raise _Unsupported("complex values (kept on the torch executor)")
            env[node] = fn(cx, *args, **kwargs)
            if isinstance(env[node], Value) and isinstance(cx.val, torch.Tensor):
                _check_type(env[node], cx.val, syms, where)
        except _Unsupported as e:
            try:
                if not opaque:
                    raise
                env[node] = _opaque(cx, args, kwargs)
            except _Unsupported as why:
                reason = "; ".join(str(x) for x in dict.fromkeys((e, why)) if str(x))
                item = (_op_name(node.target) + (f" ({reason})" if reason else ""), cx.source)
                if item not in unsupported:
                    unsupported.append(item)
        except (OpError, ValueError, TypeError) as e:
            raise TorchImportError(f"{where}: {e}") from e
    return unsupported


# ---------------------------------------------------------------------------------------
# opaque ops: kept as torch_op nodes (see nnforge.ops.fallback for the encoding)
# ---------------------------------------------------------------------------------------

_ENUM_MARKERS = {torch.layout: "$layout", torch.memory_format: "$memory_format"}


def _encode(orig, conv, tensors: list[Value], cx: _Ctx):
    """One call argument as plain JSON: tensors become {"$t": k} slots, SymInts {"$dim": ...}."""
    if isinstance(conv, Value):
        if conv not in tensors:
            tensors.append(conv)
        return {"$t": tensors.index(conv)}
    if isinstance(orig, torch.fx.Node):  # a size computed from the inputs (sym_size and friends)
        if isinstance(conv, (int, str)) and not isinstance(conv, bool):
            return conv if isinstance(conv, int) else {"$dim": conv}
        raise _Unsupported(f"argument {orig.name} of type {type(conv).__name__}")
    if isinstance(orig, (list, tuple)):
        return [_encode(o, c, tensors, cx) for o, c in zip(orig, conv)]
    if orig is None or isinstance(orig, (bool, int, str)):
        return orig
    if isinstance(orig, float):
        return (
            orig if math.isfinite(orig) else {"$float": "nan" if math.isnan(orig) else ("inf" if orig > 0 else "-inf")}
        )
    if isinstance(orig, torch.dtype):
        return {"$dtype": _dtype(orig)}
    if isinstance(orig, torch.device):
        return {"$device": str(orig)}
    if type(orig) in _ENUM_MARKERS:
        return {_ENUM_MARKERS[type(orig)]: str(orig).removeprefix("torch.")}
    raise _Unsupported(f"argument of type {type(orig).__name__}")


def _opaque(cx: _Ctx, args, kwargs):
    """Keep the current node as a torch_op: its qualified name, JSON arguments and torch's output types."""
    from ..ops.fallback import TorchOpError, resolve

    target = cx.node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise _Unsupported("not a torch operator")
    name = str(target)
    try:
        resolve(name)  # a name that does not resolve back (or a mutating op) would not run later either
    except TorchOpError as e:
        raise _Unsupported(str(e)) from None
    tensors: list[Value] = []
    enc_args = [_encode(o, c, tensors, cx) for o, c in zip(cx.node.args, args)]
    enc_kwargs = {k: _encode(cx.node.kwargs[k], v, tensors, cx) for k, v in kwargs.items()}
    vals = cx.val if isinstance(cx.val, (tuple, list)) else [cx.val]
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise _Unsupported("results that are not tensors")
    out_types = [{"shape": list(cx.syms.shape(v)), "dtype": _dtype(v.dtype)} for v in vals]
    node = cx.g.add_node(
        "torch_op",
        tensors,
        {"target": name, "args": enc_args, "kwargs": enc_kwargs, "out_types": out_types},
        name=cx.node.name,
        source=cx.source,
    )
    return list(node.outputs) if isinstance(cx.val, (tuple, list)) else node.output


def _set_outputs(g: Graph, ep, env: dict) -> None:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = [env[a] if isinstance(a, torch.fx.Node) else a for a in out_node.args[0]]
    if not all(isinstance(o, Value) for o in outs):
        raise TorchImportError(f"model outputs must be tensors, got {[type(o).__name__ for o in outs]}")
    g.outputs = outs
    _remove_dead_nodes(g)
    g.remove_unused_constants()


def import_torch(
    model: torch.nn.Module,
    example_inputs: tuple,
    dynamic_shapes=None,
    input_names: Sequence[str] | None = None,
    opaque: bool = True,
) -> Graph:
    """Export ``model`` with torch.export and convert it to an nnforge IR graph.

    ``dynamic_shapes`` is torch.export's spec; symbolic dims in the IR take the Dim names
    ("batch", "seq"). Graph inputs are named ``input_names`` or after forward()'s parameters.
    The model is exported in eval mode (its training flag is restored afterwards).
    With ``opaque`` (the default) an op that has no mapping (a rare ATen op, a custom op) is kept
    as a ``torch_op`` node that only the torch executor runs; ``compile`` then falls back to torch
    for it. Raises UnsupportedOpError listing every ATen op that cannot be kept either (or, without
    ``opaque``, every op that has no mapping), with the model source line of each, and
    TorchImportError when export itself fails.
    """
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    ep = _export(model, example_inputs, dynamic_shapes)
    g, syms = Graph(type(model).__name__), _SymbolNames()
    env = _add_inputs(g, ep, syms, model, example_inputs, dynamic_shapes, input_names)
    unsupported = _convert_nodes(g, ep, env, syms, opaque)
    if unsupported:
        raise UnsupportedOpError(unsupported, where=type(model).__name__)
    _set_outputs(g, ep, env)
    g.meta.update(
        frontend="torch",
        torch_version=torch.__version__,
        input_names=[v.name for v in g.inputs],
        output_names=_name_outputs(g),
        symbol_ranges=_symbol_ranges(ep, syms),
        output_tree=_tree_json(ep),
    )
    return g


def _remove_dead_nodes(g: Graph) -> None:
    """Drop nodes nothing uses (the unused half of max.dim, an unbind part nobody reads)."""
    live, kept = set(g.outputs), []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(i for i in n.inputs if i is not None)
    g.nodes = kept[::-1]


def _name_outputs(g: Graph) -> list[str]:
    """Give node-produced outputs readable names: 'output', or 'output_0', 'output_1', ..."""
    single = len(g.outputs) == 1
    for i, v in enumerate(g.outputs):
        if v.producer is not None and g.outputs.count(v) == 1:
            new = g.fresh_name("output" if single else f"output_{i}")
            if v.producer.name == v.name:
                v.producer.name = new
            v.name = new
    return [v.name for v in g.outputs]


def _symbol_ranges(ep, syms: _SymbolNames) -> dict[str, list]:
    """[min, max] per IR symbol (max None when unbounded), from torch.export's range constraints."""
    out = {}
    for sym, rng in ep.range_constraints.items():
        name = syms.names.get(getattr(sym, "name", ""))
        if name is not None:
            out[name] = [_bound(rng.lower), _bound(rng.upper)]
    return out


def _bound(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, AttributeError, OverflowError):  # torch's int_oo: unbounded
        return None


def _tree_json(ep) -> str | None:
    """The pytree structure of the outputs (tensor, tuple, list, dict...), as pytree's JSON."""
    try:
        return pytree.treespec_dumps(ep.call_spec.out_spec)
    except Exception:  # a custom output container pytree cannot serialise: structure is then flat
        return None
