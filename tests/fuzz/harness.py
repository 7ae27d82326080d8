"""Run one fuzz case through every runner and compare each with the reference interpreter.

Runners: the interpreter after the O0/O1/O2 pipelines, the torch executor, ONNX Runtime (on the
unoptimised and the O2 graph) and TVM when it is installed. A backend that does not take some node
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
from nnforge.ir import Graph, TensorType, interpret
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
        fast = nnforge.compile(g, xs, "cpu", backend=backend, pipeline=pipeline, check=False, progress=False,
                               cache=False, min_block_size=1)
        return fast.run(xs)

    return run


def symbolize(g: Graph) -> Graph | None:
    """The graph with axis 0 of its inputs made symbolic ("n" where it has input 0's size), types re-inferred.

    Runs on the same arrays, so it must give the same results: it exercises the backends' dynamic-shape
    code (sizes read at run time, symbolic kernels). None when the graph does not type-check that way.
    """
    from nnforge.ir import OpError, verify
    from nnforge.ir.ops import infer_types

    h = g.copy()
    if not h.inputs or not h.inputs[0].shape or h.inputs[0].shape[0] == 1:
        return None
    size = h.inputs[0].shape[0]
    if any(size in a.shape for a in h.constants.values()):
        return None  # a constant of that size would pin the symbol to it: not a dynamic graph
    for v in h.inputs:
        if v.shape and v.shape[0] == size:
            v.type = TensorType(("n",) + tuple(v.shape[1:]), v.dtype)
    try:
        for n in h.nodes:
            for o, t in zip(n.outputs, infer_types(n.op, [i.type if i is not None else None for i in n.inputs], n.attrs)):
                o.type = t
        verify(h)
    except (OpError, ValueError, NnforgeError):
        return None
    if any("/" in str(d) for v in h.all_values() for d in v.shape):
        return None  # a reshape pinned a static size: 'n/5' is not a whole dynamic dim
    return h


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


def tvm_available() -> bool:
    try:
        import nnforge.backends.tvm  # noqa: F401
        return True
    except Exception:
        return False


RUNNERS = {
    "interp:O1": _interp("O1"), "interp:O2": _interp("O2"), "torch": _torch,
    "onnxrt:O0": _backend("onnxrt"), "onnxrt:O2": _backend("onnxrt", "O2"), "tvm:O2": _backend("tvm", "O2"),
    "onnxrt:sym": _symbolic("onnxrt"), "tvm:sym": _symbolic("tvm"),
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


def check_case(graph: Graph, inputs, runners) -> list[Mismatch]:
    try:
        ref = interpret(graph, inputs)
    except Exception as e:  # the reference itself broke on a valid graph
        return [Mismatch("interpreter", f"raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")]
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
    return {"graph": graph_to_json(graph), "constants": {k: _arr_json(v) for k, v in graph.constants.items()},
            "inputs": [_arr_json(np.asarray(a)) for a in inputs], "mismatches": [str(m) for m in mismatches],
            "runners": sorted({m.runner for m in mismatches}), "note": note}


def case_from_json(doc: dict) -> tuple[Graph, list[np.ndarray]]:
    consts = {k: _arr_from(v) for k, v in doc["constants"].items()}
    return graph_from_json(doc["graph"], consts), [_arr_from(a) for a in doc["inputs"]]


def save_regression(doc: dict) -> Path:
    import hashlib

    REGRESSIONS.mkdir(parents=True, exist_ok=True)
    body = json.dumps(doc, indent=1, sort_keys=True)
    path = REGRESSIONS / f"{'-'.join(doc['runners']).replace(':', '_')}-{hashlib.sha256(body.encode()).hexdigest()[:10]}.json"
    path.write_text(body)
    return path
