"""The reference interpreter: runs a graph with the registry's numpy implementations.

It is slow and obvious on purpose: every pass and backend is checked against it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import symbols
from .graph import Graph, TensorType, numpy_dtype
from .registry import get_op


def bind_symbols(graph: Graph, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Check inputs against the graph's declared types and return symbol values.

    Raises ValueError naming the input and the expected type on a wrong count, rank, dtype or shape.
    """
    if len(arrays) != len(graph.inputs):
        raise ValueError(
            f"expected {len(graph.inputs)} input(s) ({', '.join(v.name for v in graph.inputs)}), got {len(arrays)}"
        )
    env: dict[str, int] = {}
    for v, a in zip(graph.inputs, arrays):
        want = v.type
        got = "string" if a.dtype.kind in "OU" else a.dtype.name
        if got != want.dtype:
            raise ValueError(f"input {v.name!r}: expected dtype {want.dtype} ({want}), got {a.dtype.name}")
        if a.ndim != want.rank:
            raise ValueError(f"input {v.name!r}: expected rank {want.rank} ({want}), got shape {tuple(a.shape)}")
        for axis, (d, n) in enumerate(zip(want.shape, a.shape)):
            if isinstance(d, int):
                if d != n:
                    raise ValueError(f"input {v.name!r}: expected shape {want}, got {tuple(a.shape)} (axis {axis})")
            elif d.isidentifier():
                if env.setdefault(d, int(n)) != n:
                    raise ValueError(f"input {v.name!r}: axis {axis} is {n} but symbol {d!r} is already {env[d]}")
    _check_ranges(graph, env)
    for v, a in zip(graph.inputs, arrays):  # expressions ("seq+1") are checked once all symbols are bound
        for axis, (d, n) in enumerate(zip(v.type.shape, a.shape)):
            if isinstance(d, str) and not d.isidentifier() and symbols.evaluate(d, env) != n:
                raise ValueError(f"input {v.name!r}: axis {axis} must be {d} = {symbols.evaluate(d, env)}, got {n}")
    return env


def _check_ranges(graph: Graph, env: dict[str, int]) -> None:
    """Symbols must stay in the range the model was exported for (torch.export's Dim min/max, in
    ``meta["symbol_ranges"]``): outside it the graph's shapes (e.g. a slice assumed in bounds) do not hold."""
    ranges = graph.meta.get("symbol_ranges")
    if not isinstance(ranges, dict):
        return
    for name, value in env.items():
        rng = ranges.get(name)
        lo, hi = (rng[0], rng[1]) if isinstance(rng, (list, tuple)) and len(rng) == 2 else (None, None)
        if (isinstance(lo, int) and value < lo) or (isinstance(hi, int) and value > hi):
            where = next(
                (f"input {v.name!r} axis {k}" for v in graph.inputs for k, d in enumerate(v.shape) if d == name), name
            )
            raise ValueError(
                f"{where}: size {value} is outside the range [{lo}, {'inf' if hi is None else hi}] "
                f"of symbol {name!r} the model was exported for"
            )


def run_node(node, args: list, env: dict[str, int]) -> list[np.ndarray]:
    opdef = get_op(node.op)
    attrs = opdef.bind_attrs(node.attrs, env)
    # optional trailing inputs given as None are dropped; the refs default them
    while args and args[-1] is None:
        args = args[:-1]
    with np.errstate(all="ignore"):  # NaN/Inf propagate like eager instead of warning
        res = opdef.ref(*args, **attrs)
    res = list(res) if isinstance(res, (tuple, list)) else [res]
    return [np.asarray(r).astype(numpy_dtype(o.dtype), copy=False) for r, o in zip(res, node.outputs)]


def interpret(graph: Graph, inputs: Sequence[np.ndarray], *, keep_all: bool = False):
    """Run ``graph`` on numpy inputs; returns the list of outputs (and all values if keep_all)."""
    arrays = [np.asarray(a) for a in inputs]
    env = bind_symbols(graph, arrays)
    vals: dict = {v: a for v, a in zip(graph.inputs, arrays)}
    for name, v in graph.const_values.items():
        vals[v] = graph.constants[name]
    users = graph.users()
    remaining = {v: len(us) for v, us in users.items()}
    keep = set(graph.outputs)
    for node in graph.nodes:
        outs = run_node(node, [vals[i] if i is not None else None for i in node.inputs], env)
        for o, r in zip(node.outputs, outs):
            vals[o] = r
        if not keep_all:  # free intermediates as soon as their last user ran
            for i in node.inputs:
                if i is not None and i in remaining:
                    remaining[i] -= 1
                    if remaining[i] == 0 and i not in keep and not graph.is_constant(i):
                        del vals[i]
    results = [vals[o] for o in graph.outputs]
    return (results, vals) if keep_all else results


def concrete_type(t: TensorType, env: dict[str, int]) -> TensorType:
    return TensorType(tuple(symbols.evaluate(d, env) for d in t.shape), t.dtype)
