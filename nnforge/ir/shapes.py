"""Shape arithmetic shared by the ops' shape rules: axes, broadcasting, dtype agreement, window sizes."""

from __future__ import annotations

from typing import Sequence

from . import symbols
from .graph import TensorType
from .registry import OpError
from .symbols import Dim

BIG = 2**62  # "to the end" for slice ends


def norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim], op: str = "broadcast") -> tuple[Dim, ...]:
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == 1:
            out.append(y)
        elif y == 1 or symbols.dims_equal(x, y):
            out.append(x)
        elif isinstance(x, int) and isinstance(y, int):
            raise OpError(f"{op}: shapes {tuple(a)} and {tuple(b)} do not broadcast")
        else:
            out.append(x if isinstance(y, int) else y)  # symbolic vs other: trust the symbol
    return tuple(reversed(out))


def same_dtype(types, op):
    dts = {t.dtype for t in types if t is not None}
    if len(dts) > 1:
        raise OpError(f"{op}: input dtypes differ {sorted(dts)}")
    return dts.pop()


def float_only(t: TensorType, op: str):
    if t.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise OpError(f"{op}: needs a float input, got {t.dtype}")


def pair(v):
    return list(v) if len(v) == 2 else [v[0], v[0]]


def conv_out(size: Dim, k: int, s: int, p: int, d: int, ceil_mode=False) -> Dim:
    eff = d * (k - 1) + 1
    if isinstance(size, int):
        num = size + 2 * p - eff
        out = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:  # last window must start inside the input
            out -= 1
        if out <= 0:
            raise OpError(f"window of {eff} does not fit input of size {size} (padding {p})")
        return out
    expr = symbols.to_sympy(size) + 2 * p - eff
    import sympy

    return symbols.from_sympy((sympy.ceiling(expr / s) if ceil_mode else sympy.floor(expr / s)) + 1)


def specialize(graph, env: dict[str, int]):
    """A copy of ``graph`` with the symbols of ``env`` fixed (e.g. ``{"seq": 1}``: a decode step): the inputs'
    types, dimensions in shape attributes (reshape / expand targets) and every inferred type after them.
    Backends then see static extents where the symbols were (a kernel for one row, not for any number)."""
    from . import symbols as S
    from .registry import infer_types

    def dim(d):
        if isinstance(d, str) and S.symbols_in(d) & env.keys():
            return S.from_sympy(S.to_sympy(d).subs({S.to_sympy(k): v for k, v in env.items()}))
        return d

    def attr(v):
        return type(v)(dim(d) for d in v) if isinstance(v, (tuple, list)) else v

    g = graph.copy()
    for v in g.inputs:
        v.type = TensorType(tuple(dim(d) for d in v.type.shape), v.type.dtype)
    for n in g.nodes:
        n.attrs = {k: attr(v) for k, v in n.attrs.items()}
        types = infer_types(n.op, [i.type if i is not None else None for i in n.inputs], n.attrs)
        for out, t in zip(n.outputs, types):
            out.type = t
    return g
