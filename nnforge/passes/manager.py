"""Passes and the pass manager.

A pass is a small class with a ``name``, a ``lossy`` flag and ``run(graph, ctx) -> PassResult``.
A pass with settings declares their type (``Options``, a dataclass) and carries an instance:
``TokenMergePass(TokenMerge(r=8))``; by name it runs with the defaults. A pass states what it
must run after or before (``runs_after`` / ``runs_before``: pass names) and which graph
properties it reads or breaks (``requires`` / ``invalidates``, e.g. "blocks": the transformer
block structure); a pipeline that contradicts them is refused when the PassManager is built.

The manager runs a pipeline (a list of pass names, instances, settings objects or pipeline
names), records per pass its wall time and node counts, and in check mode verifies the IR and
compares the reference interpreter's outputs before and after each pass: the first lossless pass
that moves the outputs beyond tolerance is named in a NumericsError. ``NNFORGE_DUMP_IR=dir``
writes the IR after each pass.
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


@dataclass
class PassResult:
    changed: bool
    stats: dict = field(default_factory=dict)
    graph: Graph | None = None  # set when the pass built a new graph instead of editing in place


class Pass:
    name: str = ""
    lossy: bool = False
    version: str = "1"  # bump when behaviour changes (compile caches key on it)
    Options: type | None = None  # the settings dataclass the pass takes, if any
    options: Any = None  # an instance of Options (the defaults when none was given)
    runs_after: tuple[str, ...] = ()  # passes that must come earlier when both are in a pipeline
    runs_before: tuple[str, ...] = ()  # passes that must come later
    requires: tuple[str, ...] = ()  # graph properties the pass reads, e.g. "blocks"
    invalidates: tuple[str, ...] = ()  # graph properties it breaks for later passes

    def __init__(self, options=None):
        if self.Options is None:
            if options is not None:
                raise NnforgeError(f"pass {self.name!r} takes no options, got {options!r}")
        elif options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise NnforgeError(
                f"pass {self.name!r} takes {self.Options.__name__} options, got {type(options).__name__}"
            )
        self.options = options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pass {self.name}" + (f" {self.options}>" if self.options is not None else ">")


class PassOptions:
    """Mixin for a pass's settings dataclass: ``pass_name`` names the pass it configures, which
    ``make_pass()`` builds (``nnforge.compile`` and pipelines accept the settings object itself)."""

    pass_name: str = ""

    def make_pass(self) -> Pass:
        return make_pass(self.pass_name, self)


PASSES: dict[str, Callable[..., Pass]] = {}


def register_pass(cls):
    """Class decorator: make a pass available by name in pipelines."""
    if not getattr(cls, "name", ""):
        raise NnforgeError(f"pass {cls.__name__} has no name")
    PASSES[cls.name] = cls
    return cls


_CLEANUP = ["dce", "canonicalize", "fold_constants", "cse", "dce"]
_FUSION = [
    "fold_constant_chains",
    "recognize_norms",
    "fuse_linear_act",
    "fuse_attention",
    "fuse_torch_mha",
    "fold_constants",
    "cse",
    "canonicalize",
    "dce",
]  # folding again: fusion leaves weight-only work behind
PIPELINES: dict[str, list[str]] = {
    "O0": _CLEANUP,  # cleanup only
    "O1": _CLEANUP + _FUSION,  # + lossless fusion
    # + layout: sibling projections share one matmul; rows nobody reads are not computed
    "O2": _CLEANUP + _FUSION + ["merge_qkv", "sink_slices", "cse", "dce"],
}


def make_pass(name: str, options=None) -> Pass:
    """The registered pass ``name`` with its settings (None: the pass's defaults)."""
    _load_builtin_passes()
    if name not in PASSES:
        raise NnforgeError(f"unknown pass {name!r}; registered passes are {sorted(PASSES)}")
    return PASSES[name](options)


def resolve_pipeline(pipeline: str | Sequence[str | Pass | PassOptions]) -> list[Pass]:
    """A pipeline name, or a list of pass names, pass instances, settings objects (which build their
    pass) and pipeline names (expanded in place)."""
    _load_builtin_passes()
    if isinstance(pipeline, str) and pipeline not in PIPELINES:
        raise NnforgeError(f"unknown pipeline {pipeline!r}; named pipelines are {sorted(PIPELINES)}")
    out = []
    for p in [pipeline] if isinstance(pipeline, str) else pipeline:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, PassOptions):
            out.append(p.make_pass())
        elif p in PIPELINES:
            out += [PASSES[name]() for name in PIPELINES[p]]
        elif p in PASSES:
            out.append(PASSES[p]())
        else:
            raise NnforgeError(f"unknown pass {p!r}; registered passes are {sorted(PASSES)}")
    return out


def _load_builtin_passes():
    from . import blocks, cleanup, fusion, layers, lowbit, sparsity, tokens  # noqa: F401  (they register on import)


def order_problem(early: Pass, late: Pass) -> str | None:
    """Why ``late`` may not run after ``early`` (it must come first), or None when the order is fine."""
    if late.name in early.runs_after:
        return f"{early.name!r} runs after {late.name!r}"
    if early.name in late.runs_before:
        return f"{late.name!r} runs before {early.name!r}"
    broken = set(early.invalidates) & set(late.requires)
    if broken:
        return f"{early.name!r} breaks the {', '.join(sorted(broken))} that {late.name!r} reads"
    return None


def check_order(passes: Sequence[Pass]) -> None:
    """Refuse a pipeline that contradicts its passes' declared ordering, naming both passes."""
    for i, early in enumerate(passes):
        for j in range(i + 1, len(passes)):
            why = order_problem(early, passes[j])
            if why:
                raise NnforgeError(
                    f"pipeline order: pass {passes[j].name!r} (#{j + 1}) must run before "
                    f"{early.name!r} (#{i + 1}): {why}"
                )


def split_after(passes: Sequence[Pass], then: Sequence[Pass]) -> tuple[list[Pass], list[Pass]]:
    """``passes`` split into those that may run before ``then`` and those that must wait until after it
    (by the passes' declared ordering, and after any pass that itself waits), both in their order."""
    before, after = [], []
    for p in passes:
        (after if any(order_problem(p, q) for q in [*then, *after]) else before).append(p)
    return before, after


def max_rel_error(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """max |ref - got| / max(1, max |ref|) over all outputs; NaN/Inf must sit in the same places."""
    worst = 0.0
    for r, g in zip(ref, got):
        if np.asarray(r).dtype.kind in "OUS" or np.asarray(g).dtype.kind in "OUS":  # strings: equal or not
            if np.shape(r) != np.shape(g) or not np.array_equal(np.asarray(r, object), np.asarray(g, object)):
                return float("inf")
            continue
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
    def __init__(
        self,
        pipeline: str | Sequence[str | Pass] = "O2",
        *,
        check: bool = False,
        tolerance: float = 1e-4,
        dump_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.pipeline_name = pipeline if isinstance(pipeline, str) else "custom"
        self.passes = resolve_pipeline(pipeline)
        check_order(self.passes)
        self.check = check
        self.tolerance = tolerance
        self.dump_dir = (
            Path(dump_dir or os.environ.get("NNFORGE_DUMP_IR", ""))
            if (dump_dir or os.environ.get("NNFORGE_DUMP_IR"))
            else None
        )
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
                    raise NumericsError(
                        f"pass {p.name!r} (#{k}, lossless) changed the outputs: max relative error "
                        f"{rec.max_error:.3g} > tolerance {self.tolerance:g}"
                    )
                ref = out
        return graph

    def _dump(self, graph: Graph, k: int, name: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{k:02d}_{name}.ir").write_text(format_graph(graph) + "\n")
