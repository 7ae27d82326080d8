"""Passes and the pass manager.

A pass is a small class with a ``name``, a ``lossy`` flag and ``run(graph, ctx) -> PassResult``.
The manager runs a pipeline (a list of pass names or instances), records per pass its wall
time and node counts, and in check mode verifies the IR and compares the reference
interpreter's outputs before and after each pass: the first lossless pass that moves the
outputs beyond tolerance is named in a NumericsError. ``NNFORGE_DUMP_IR=dir`` writes the IR
after each pass.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import NnforgeError, NumericsError, VerificationError
from ..ir import Graph, interpret, verify
from ..ir.printer import format_graph


@dataclass
class PassContext:
    """What a pass may look at besides the graph."""

    sample_inputs: list[np.ndarray] | None = None  # example inputs (check mode, calibration)
    calibration: list[list[np.ndarray]] | None = None
    target: Any = None
    backend: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class PassResult:
    changed: bool
    stats: dict = field(default_factory=dict)
    graph: Graph | None = None  # set when the pass built a new graph instead of editing in place


class Pass:
    name: str = ""
    lossy: bool = False
    version: str = "1"  # bump when behaviour changes (compile caches key on it)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


PASSES: dict[str, Callable[[], Pass]] = {}


def register_pass(cls):
    """Class decorator: make a pass available by name in pipelines."""
    if not getattr(cls, "name", ""):
        raise NnforgeError(f"pass {cls.__name__} has no name")
    PASSES[cls.name] = cls
    return cls


_CLEANUP = ["dce", "canonicalize", "fold_constants", "cse", "dce"]
_FUSION = ["fold_constant_chains", "recognize_norms", "fuse_linear_act", "fuse_attention", "fuse_torch_mha",
           "fold_constants", "cse",
           "canonicalize", "dce"]  # folding again: fusion leaves weight-only work behind
PIPELINES: dict[str, list[str]] = {
    "O0": _CLEANUP,  # cleanup only
    "O1": _CLEANUP + _FUSION,  # + lossless fusion
    # + layout: sibling projections share one matmul; rows nobody reads are not computed
    "O2": _CLEANUP + _FUSION + ["merge_qkv", "sink_slices", "cse", "dce"],
}


def resolve_pipeline(pipeline: str | Sequence[str | Pass]) -> list[Pass]:
    """A pipeline name, or a list of pass names, pass instances and pipeline names (expanded in place)."""
    _load_builtin_passes()
    if isinstance(pipeline, str) and pipeline not in PIPELINES:
        raise NnforgeError(f"unknown pipeline {pipeline!r}; named pipelines are {sorted(PIPELINES)}")
    out = []
    for p in [pipeline] if isinstance(pipeline, str) else pipeline:
        if isinstance(p, Pass):
            out.append(p)
        elif p in PIPELINES:
            out += [PASSES[name]() for name in PIPELINES[p]]
        elif p in PASSES:
            out.append(PASSES[p]())
        else:
            raise NnforgeError(f"unknown pass {p!r}; registered passes are {sorted(PASSES)}")
    return out


def _load_builtin_passes():
    from . import blocks, cleanup, fusion, layers, quantize, sparsity, tokens  # noqa: F401  (they register on import)


def max_rel_error(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """max |ref - got| / max(1, max |ref|) over all outputs; NaN/Inf must sit in the same places."""
    worst = 0.0
    for r, g in zip(ref, got):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return float("inf")
        bad_r, bad_g = ~np.isfinite(r), ~np.isfinite(g)
        if not np.array_equal(bad_r, bad_g) or not np.array_equal(r[bad_r], g[bad_g], equal_nan=True):
            return float("inf")
        if r.size == 0:
            continue
        scale = max(1.0, float(np.max(np.abs(r[~bad_r]), initial=0.0)))
        worst = max(worst, float(np.max(np.abs(r[~bad_r] - g[~bad_g]), initial=0.0)) / scale)
    return worst


@dataclass
class PassRecord:
    name: str
    lossy: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    max_error: float | None = None  # vs the outputs before the pass, in check mode
    stats: dict = field(default_factory=dict)


class PassManager:
    def __init__(self, pipeline: str | Sequence[str | Pass] = "O2", *, check: bool = False, tolerance: float = 1e-4,
                 dump_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = None):
        self.pipeline_name = pipeline if isinstance(pipeline, str) else "custom"
        self.passes = resolve_pipeline(pipeline)
        self.check = check
        self.tolerance = tolerance
        self.dump_dir = Path(dump_dir or os.environ.get("NNFORGE_DUMP_IR", "")) if (dump_dir or os.environ.get("NNFORGE_DUMP_IR")) else None
        self.progress = progress
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        if self.check and ctx.sample_inputs is None:
            raise NnforgeError("check mode needs ctx.sample_inputs to compare outputs")
        ref = interpret(graph, ctx.sample_inputs) if self.check else None
        self._dump(graph, 0, "input")
        for k, p in enumerate(self.passes, 1):
            if self.progress:
                self.progress(p.name)
            before = len(graph.nodes)
            t0 = time.perf_counter()
            res = p.run(graph, ctx)
            seconds = time.perf_counter() - t0
            graph = res.graph if res.graph is not None else graph
            rec = PassRecord(p.name, p.lossy, seconds, before, len(graph.nodes), res.changed, stats=res.stats)
            self.records.append(rec)
            self._dump(graph, k, p.name)
            if self.check:
                try:
                    verify(graph)
                except VerificationError as e:
                    raise VerificationError(f"after pass {p.name!r} (#{k}): {e}") from None
                out = interpret(graph, ctx.sample_inputs) if res.changed else ref
                rec.max_error = max_rel_error(ref, out)
                if not p.lossy and rec.max_error > self.tolerance:
                    raise NumericsError(f"pass {p.name!r} (#{k}, lossless) changed the outputs: max relative error "
                                        f"{rec.max_error:.3g} > tolerance {self.tolerance:g}")
                ref = out
        return graph

    def _dump(self, graph: Graph, k: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{k:02d}_{name}.ir").write_text(format_graph(graph) + "\n")
