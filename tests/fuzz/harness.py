"""Run one fuzz case through every runner and compare each with the reference interpreter.

Runners: the interpreter after the O0/O1/O2 pipelines, the torch executor, ONNX Runtime (on the
unoptimised and the O2 graph) and TVM. A backend that does not take some node
goes through ``nnforge.compile``'s partitioning, so partition plans are fuzzed too. A runner that
raises is a mismatch as well (except an UnsupportedOpError: a documented refusal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import nnforge
from nnforge.errors import NnforgeError, UnsupportedOpError
from nnforge.ir import Graph, TensorType, interpret, symbols
from nnforge.ir.serialize import graph_from_json, graph_to_json
from nnforge.passes.manager import PassManager

REGRESSIONS = Path(__file__).parent / "regressions"
RTOL, ATOL = 2e-4, 2e-5  # float32: a few ulps through a handful of ops, relative to each output's scale


def _interp(pipeline):
    def run(g: Graph, xs):
        return interpret(PassManager(pipeline, check=False).run(g.copy()), xs)

    return run


def _backend(backend, pipeline="O0"):
    def run(g: Graph, xs):
        fast = nnforge.compile(
            g, xs, "cpu", backend=backend, pipeline=pipeline, check=False, progress=False, cache=False, min_block_size=1
        )
        return fast.run(xs)

    return run


def symbolize(g: Graph) -> Graph | None:
    """The graph with axis 0 of its inputs made symbolic ("n" where it has input 0's size), types re-inferred.

    Runs on the same arrays, so it must give the same results: it exercises the backends' dynamic-shape
    code (sizes read at run time, symbolic kernels). None when the graph does not type-check that way.
    """
    from nnforge.ir import OpError, verify
    from nnforge.ir.registry import infer_types

    h = g.copy()
    if not h.inputs or not h.inputs[0].shape or h.inputs[0].shape[0] == 1:
        return None
    size = h.inputs[0].shape[0]
    if any(size in a.shape for a in h.constants.values()) or any(n.op == "torch_op" for n in h.nodes):
        return None  # a constant of that size (or a torch_op's recorded static type) pins the symbol: not dynamic
    for v in h.inputs:
        if v.shape and v.shape[0] == size:
            v.type = TensorType(("n",) + tuple(v.shape[1:]), v.dtype)
    try:
        for n in h.nodes:
            for o, t in zip(
                n.outputs, infer_types(n.op, [i.type if i is not None else None for i in n.inputs], n.attrs)
            ):
                o.type = t
        verify(h)
    except (OpError, ValueError, NnforgeError):
        return None
    if any("/" in str(d) for v in h.all_values() for d in v.shape):
        return None  # a reshape pinned a static size: 'n/5' is not a whole dynamic dim
    if any(_mixes_symbol_and_size(n) for n in h.nodes):
        return None  # "n" broadcast against a static size (from a pinned reshape/expand): n must equal it
    original = {v.name: v.type for v in g.all_values()}
    for v in h.all_values():  # at n = size every type must be the static one (a slice past n would not be)
        if tuple(symbols.evaluate(d, {"n": size}) for d in v.shape) != original[v.name].shape:
            return None
    return h


def _mixes_symbol_and_size(node) -> bool:
    """A broadcasting op that lines "n" up against a static size (other than 1)."""
    from nnforge.ir import get_op

    if get_op(node.op).kind != "elementwise":
        return False
    shapes = [i.shape for i in node.inputs if i is not None]
    for k in range(1, max((len(s) for s in shapes), default=0) + 1):
        dims = {s[-k] for s in shapes if len(s) >= k} - {1}
        if any(isinstance(d, str) for d in dims) and any(isinstance(d, int) for d in dims):
            return True
    return False


def _symbolic(backend):
    def run(g: Graph, xs):
        h = symbolize(g)
        if h is None:
            raise UnsupportedOpError([], where="symbolize")  # not applicable: skipped
        return _backend(backend, "O2")(h, xs)

    return run


def _torch(g: Graph, xs):
    from nnforge.backends.torch_exec import run_graph_torch

    return run_graph_torch(g, xs)


RUNNERS = {
    "interp:O1": _interp("O1"),
    "interp:O2": _interp("O2"),
    "torch": _torch,
    "onnxrt:O0": _backend("onnxrt"),
    "onnxrt:O2": _backend("onnxrt", "O2"),
    "tvm:O2": _backend("tvm", "O2"),
    "onnxrt:sym": _symbolic("onnxrt"),
    "tvm:sym": _symbolic("tvm"),
}


@dataclass
class Mismatch:
    runner: str
    detail: str

    def __str__(self) -> str:
        return f"{self.runner}: {self.detail}"


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> str | None:
    """None if ``got`` matches ``ref`` (float tolerance, exact for ints/bools, NaN/Inf in the same places)."""
    if len(ref) != len(got):
        return f"{len(got)} outputs, expected {len(ref)}"
    for k, (r, g) in enumerate(zip(ref, got)):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape or r.dtype != g.dtype:
            return f"output {k}: {g.dtype}{list(g.shape)}, expected {r.dtype}{list(r.shape)}"
        if r.dtype.kind != "f":
            if not np.array_equal(r, g):
                return f"output {k}: {int(np.sum(r != g))} of {r.size} elements differ (first at {np.argwhere(r != g)[0].tolist()})"
            continue
        rf, gf = r.astype(np.float64), g.astype(np.float64)
        if not np.array_equal(np.isnan(rf), np.isnan(gf)):
            return f"output {k}: NaN in different places"
        fin = np.isfinite(rf) & np.isfinite(gf)
        if not np.array_equal(rf[~fin & ~np.isnan(rf)], gf[~fin & ~np.isnan(rf)]):
            return f"output {k}: Inf in different places"
        scale = max(1.0, float(np.max(np.abs(rf[fin]), initial=0.0)))
        err = np.abs(rf[fin] - gf[fin])
        if err.size and float(err.max()) > ATOL * scale + RTOL * scale:
            return f"output {k}: max abs error {float(err.max()):.3g} (scale {scale:.3g})"
    return None


# Discontinuous ops: a last-ulp difference upstream may flip their result. A case where one of them
# decides within MARGIN of its boundary proves nothing about a backend, so it is not compared; nor is
# one that casts NaN, Inf or an out-of-range float to an integer (undefined in C, numpy and torch).
MARGIN = 1e-4
_COMPARES = ("eq", "ne", "lt", "le", "gt", "ge")


def _close_to_boundary(node, vals) -> bool:
    ins = [vals.get(i) for i in node.inputs]
    if not ins or ins[0] is None or np.asarray(ins[0]).dtype.kind != "f":
        return False
    x = np.asarray(ins[0], np.float64)
    with np.errstate(all="ignore"):
        if node.op in _COMPARES:
            y = np.asarray(ins[1], np.float64)
            gap = np.abs(x - y)
            near = (gap > 0) & np.isfinite(gap) & (gap <= MARGIN * np.maximum(1.0, np.maximum(np.abs(x), np.abs(y))))
            return bool(np.any(near))
        to_int = node.op == "cast" and node.attrs["dtype"] in ("int64", "int32", "int16", "int8", "uint8")
        if to_int and not np.all(np.abs(x) < 2.0**31):  # NaN, Inf or out of range: undefined (C, numpy, torch)
            return True
        if node.op in ("floor", "ceil") or to_int or (node.op == "cast" and node.attrs["dtype"] == "bool"):
            frac = np.abs(x - np.round(x))
            return bool(np.any((frac > 0) & (frac <= MARGIN * np.maximum(1.0, np.abs(x)))))
        if node.op == "argmax" and x.size:
            top2 = -np.sort(-np.moveaxis(x, node.attrs["axis"], -1), axis=-1)[..., :2]
            return top2.shape[-1] == 2 and bool(np.any(np.abs(top2[..., 0] - top2[..., 1]) <= MARGIN))
    return False


def fragile(graph: Graph, inputs) -> bool:
    """Does some discontinuous op decide within MARGIN of its boundary on these inputs?"""
    _, vals = interpret(graph, inputs, keep_all=True)
    return any(_close_to_boundary(n, vals) for n in graph.nodes)


def check_case(graph: Graph, inputs, runners) -> list[Mismatch]:
    try:
        ref = interpret(graph, inputs)
    except Exception as e:  # the reference itself broke on a valid graph
        return [Mismatch("interpreter", f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")]
    if fragile(graph, inputs):
        return []
    out = []
    for name in runners:
        try:
            got = RUNNERS[name](graph, inputs)
        except UnsupportedOpError:
            continue
        except Exception as e:  # a crash is a finding too
            out.append(Mismatch(name, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
            continue
        why = compare(ref, got)
        if why:
            out.append(Mismatch(name, why))
    return out


# ---------------------------------------------------------------------------------------
# regression files: the IR as JSON, constants and inputs inline (small by construction)
# ---------------------------------------------------------------------------------------


def _arr_json(a: np.ndarray) -> dict:
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.reshape(-1).tolist()}


def _arr_from(obj) -> np.ndarray:
    return np.asarray(obj["data"], dtype=obj["dtype"]).reshape(obj["shape"])


def case_to_json(graph: Graph, inputs, mismatches: list[Mismatch], note: str = "") -> dict:
    return {
        "graph": graph_to_json(graph),
        "constants": {k: _arr_json(v) for k, v in graph.constants.items()},
        "inputs": [_arr_json(np.asarray(a)) for a in inputs],
        "mismatches": [str(m) for m in mismatches],
        "runners": sorted({m.runner for m in mismatches}),
        "note": note,
    }


def case_from_json(doc: dict) -> tuple[Graph, list[np.ndarray]]:
    consts = {k: _arr_from(v) for k, v in doc["constants"].items()}
    return graph_from_json(doc["graph"], consts), [_arr_from(a) for a in doc["inputs"]]


def save_regression(doc: dict) -> Path:
    import hashlib

    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    body = json.dumps(doc, indent=1, sort_keys=True)
    path = (
        REGRESSIONS
        / f"{'-'.join(doc['runners']).replace(':', '_')}-{hashlib.sha256(body.encode()).hexdigest()[:10]}.json"
    )
    path.write_text(body)
    return path
