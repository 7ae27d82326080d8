"""Accuracy-budgeted search over the lossy passes: the fastest setting whose quality drop stays in budget.

``search(graph, Budget(metric="cosine", max_drop=0.01), calibration, heldout, time_fn)`` tries
settings of token merging (r), token pruning (keep ratio), layer skipping (blocks removed),
sparsity (the fraction of each linear/conv weight row pruned by Wanda, linears then stored as CSR
where smaller) and quantization ("float", "int8" weight-only, "w8a8" int8 weights + dynamic int8
activations) jointly, each where it applies: the token and layer knobs need transformer blocks, so a
CNN or an MLP gets the sparsity and quantization ones (``default_space``). A quantization the backend
cannot build (``time_fn`` raises an NnforgeError) is left out. For each
setting it builds the graph, measures the quality drop against the lossless graph on the
calibration batches, and times it with ``time_fn(graph) -> seconds`` (the real target backend, as
the caller wires it; ``flop_time`` is a deterministic stand-in). The fastest setting within the
budget on calibration (with a safety margin) is then measured on the held-out batches, which it
has never been chosen on; if it misses the budget there, the next fastest is tried. The result
reports the held-out drop and the speed-up over the lossless graph.

Quality is compared on the first graph output. ``metric`` is "cosine" (mean cosine similarity of
output rows to the lossless ones), "top1" (agreement of the arg-max) or a callable
``metric(outputs, reference) -> quality`` (higher is better) over the outputs of all held-out
batches concatenated in order, e.g. accuracy against labels the callable closes over. The drop is
``metric(reference, reference) - metric(outputs, reference)``.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .. import scale
from ..errors import NnforgeError
from ..ir import Graph, interpret, symbols
from ..ir.interpret import bind_symbols
from .blocks import BlockInfo, find_blocks, require_blocks
from .layers import SkipLayers, SkipLayersPass
from .lowbit import Quantize
from .lowbit.passes import QuantizeFromSettings
from .manager import Pass, PassContext
from .sparsity import Sparsity, SparsityFromSettings
from .tokens import TokenMerge, TokenMergePass, TokenPrune, TokenPrunePass

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass
class Budget:
    metric: str | Metric = "cosine"
    max_drop: float = 0.01
    # the search space; None picks candidates from the model's size
    merge_r: Sequence[int] | None = None
    prune_keep: Sequence[float] | None = None
    skip: Sequence[int] | None = None
    quantize: Sequence[str] | None = None  # of QUANT; None: DEFAULT_QUANT for the backend (else all)
    sparsity: Sequence[float] | None = None  # pruned fractions in [0, 1); None: DEFAULT_SPARSITY (see default_space)
    margin: float = 0.8  # calibration must show at most margin * max_drop
    # where candidates are evaluated: None (here, or on Ray once ray.init ran in this process), "serial", "ray"
    # or a Ray address (nnforge.scale)
    executor: str | None = None


QUANT = ("float", "int8", "w8a8")  # weakest first: w8a8 uses the int8 weights and quantizes activations too
# the default quantization choices per backend: on TVM int8 weight-only runs about as fast as float (the
# weights are dequantized inside the float matmul), so it is not worth a search step; W8A8 runs int8 dot
# products where the CPU has VNNI (bench BERT: ~1.9x float)
DEFAULT_QUANT = {"tvm": ("float", "w8a8")}
# the default pruned fractions for a model without transformer blocks (with blocks the token and layer knobs
# are the search; Budget(sparsity=...) adds sparsity there); TVM runs a CSR kernel only where at most 20% of a
# linear's weights are stored (tvm_sparse.MAX_DENSITY): sparser than that it runs the dense kernel
DEFAULT_SPARSITY = {"tvm": (0.0, 0.8, 0.9)}
SPARSITY = (0.0, 0.5, 0.8, 0.9)


def _sparsity_config(ratio: float) -> Sparsity:
    return Sparsity(method="wanda", ratio=ratio, storage="csr")


def _quantize_config(name: str) -> Quantize:
    return Quantize(weights="int8", activations="dynamic" if name == "w8a8" else None)


@dataclass(frozen=True)
class Setting:
    merge_r: int = 0
    prune_keep: float = 1.0
    skip: int = 0
    quant: str = "float"
    sparsity: float = 0.0  # fraction of each weight row pruned

    @property
    def lossless(self) -> bool:
        return (
            self.merge_r == 0
            and self.prune_keep == 1.0
            and self.skip == 0
            and self.quant == "float"
            and not self.sparsity
        )

    def passes(self):
        """The lossy passes for this setting, in the order they compose: skip, sparsity, prune, merge, quantize."""
        out = []
        if self.skip:
            out.append(SkipLayersPass(SkipLayers(n=self.skip)))
        if self.sparsity:
            out.append(SparsityFromSettings(_sparsity_config(self.sparsity)))
        if self.prune_keep < 1.0:
            out.append(TokenPrunePass(TokenPrune(keep=self.prune_keep)))
        if self.merge_r:
            out.append(TokenMergePass(TokenMerge(r=self.merge_r)))
        if self.quant != "float":
            out.append(QuantizeFromSettings(_quantize_config(self.quant)))
        return out

    def dominates(self, other: "Setting") -> bool:
        """At least as strong in every knob (so at least as lossy, as far as the search assumes)."""
        return (
            self.merge_r >= other.merge_r
            and self.prune_keep <= other.prune_keep
            and self.skip >= other.skip
            and self.sparsity >= other.sparsity
            and QUANT.index(self.quant) >= QUANT.index(other.quant)
        )

    def __str__(self) -> str:
        parts = (
            ([f"merge r={self.merge_r}"] if self.merge_r else [])
            + ([f"prune keep={self.prune_keep:g}"] if self.prune_keep < 1 else [])
            + ([f"skip {self.skip}"] if self.skip else [])
            + ([f"sparsity {self.sparsity:g}"] if self.sparsity else [])
            + ([self.quant] if self.quant != "float" else [])
        )
        return ", ".join(parts) or "lossless"


def search_passes() -> list[Pass]:
    """One of each pass the search may run: what a pipeline around the search is ordered by."""
    return Setting(merge_r=1, prune_keep=0.5, skip=1, quant="int8", sparsity=0.5).passes()


@dataclass
class Candidate:
    setting: Setting
    drop: float | None = None  # on calibration
    seconds: float | None = None
    heldout_drop: float | None = None
    error: str = ""  # why the setting could not be built

    @property
    def evaluated(self) -> bool:
        return self.drop is not None


@dataclass
class BudgetResult:
    setting: Setting
    graph: Graph
    drop: float  # on the held-out batches
    seconds: float
    baseline_seconds: float
    budget: Budget
    candidates: list[Candidate] = field(default_factory=list)
    space: "Space | None" = None

    @property
    def speedup(self) -> float:
        return self.baseline_seconds / max(self.seconds, 1e-12)

    def report(self) -> str:
        name = (
            self.budget.metric
            if isinstance(self.budget.metric, str)
            else getattr(self.budget.metric, "__name__", "metric")
        )
        tried = sum(c.evaluated for c in self.candidates)
        return (
            f"budget: {name} drop <= {self.budget.max_drop:g}\n"
            f"chosen: {self.setting}\n"
            f"held-out drop: {self.drop:.4g} ({'within' if self.drop <= self.budget.max_drop else 'OVER'} budget)\n"
            f"speed-up: {self.speedup:.2f}x ({self.baseline_seconds:.4g}s -> {self.seconds:.4g}s)\n"
            f"candidates: {tried} measured of {len(self.candidates)}"
            + (f"\nsearched: {self.space.describe()}" if self.space is not None else "")
        )


# ---------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a.reshape(1, -1)


def cosine_quality(out: np.ndarray, ref: np.ndarray) -> float:
    a, b = _rows(out), _rows(ref)
    return float(np.mean((a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)))


def top1_quality(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.argmax(_rows(out), -1) == np.argmax(_rows(ref), -1)))


METRICS: dict[str, Metric] = {"cosine": cosine_quality, "top1": top1_quality}


def metric_fn(metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise NnforgeError(f"budget: metric must be one of {sorted(METRICS)} or a callable, got {metric!r}")
    return METRICS[metric]


def _comparable(out: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A pruned decoder returns fewer token rows; its last one (the next-token logits) is what counts."""
    if out.shape != ref.shape and out.ndim == ref.ndim == 3:
        return out[:, -1], ref[:, -1]
    return out, ref


def outputs(graph: Graph, batches, run=interpret) -> list[np.ndarray]:
    return [np.asarray(run(graph, list(b))[0]) for b in batches]


def quality_drop(metric: Metric, got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    pairs = [_comparable(g, r) for g, r in zip(got, ref)]
    o, r = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    return float(metric(r, r) - metric(o, r))


# ---------------------------------------------------------------------------------------
# timing stand-in: a FLOP count
# ---------------------------------------------------------------------------------------


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _attention_cost(n, shp):
    q, k = shp(n.inputs[0]), shp(n.inputs[1])
    queries = 1 if n.attrs.get("query") in ("first", "last") else q[1]
    return 2 * q[0] * queries * k[1] * q[2]


def _grid_merge_cost(n, shp):
    """The cosine similarities of about 3/4 of the tokens (sources) with 1/4 (destinations, stride 2x2)."""
    b, tokens, hidden = shp(n.inputs[0])
    dst = tokens // (n.attrs["stride"][0] * n.attrs["stride"][1])
    return b * (tokens - dst) * dst * hidden + 2 * b * tokens * hidden


# op -> cost(node, shape_of) in multiply-adds; everything else costs one per output element
COSTS = {
    "linear": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[1])[1],
    "linear_act": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[1])[1],
    "matmul": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[0])[-1],
    "attention": _attention_cost,
    "attention_scores": _attention_cost,
    "qlinear": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[0])[-1],
    "qconv2d": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[1])[1] * (2 if n.attrs["bits"] == 4 else 1),
    "grid_merge": _grid_merge_cost,
    "conv2d": lambda n, shp: _numel(shp(n.output)) * _numel(shp(n.inputs[1])[1:]),
    # per output row, one multiply-add per stored weight (values: [nnz]; row_ptr: [out features + 1])
    "sparse_linear": lambda n, shp: _numel(shp(n.output)) * shp(n.inputs[1])[0] // max(1, shp(n.inputs[3])[0] - 1),
}


def flops(graph: Graph, inputs: Sequence[np.ndarray]) -> int:
    """Multiply-adds of one run on ``inputs`` (symbolic dims bound from them)."""
    env = bind_symbols(graph, [np.asarray(a) for a in inputs])

    def shp(v):
        return [symbols.evaluate(d, env) for d in v.shape]

    return sum(COSTS[n.op](n, shp) if n.op in COSTS else sum(_numel(shp(o)) for o in n.outputs) for n in graph.nodes)


def flop_time(inputs: Sequence[np.ndarray], flops_per_second: float = 1e10) -> Callable[[Graph], float]:
    """A deterministic ``time_fn``: seconds as if the graph ran at a fixed FLOP rate."""
    return lambda graph: flops(graph, inputs) / flops_per_second


def wall_time(
    run: Callable[[Graph], Callable[[list], list]], inputs: Sequence[np.ndarray], repeat: int = 5
) -> Callable[[Graph], float]:
    """A measuring ``time_fn``: ``run(graph)`` builds an executable (e.g. a backend artifact's run); median of ``repeat``."""

    def time_fn(graph: Graph) -> float:
        fn = run(graph)
        fn(list(inputs))  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(list(inputs))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return time_fn


# ---------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------


def _tokens(info: BlockInfo, graph: Graph, batch) -> int:
    env = bind_symbols(graph, [np.asarray(a) for a in batch])
    return symbols.evaluate(info.tokens, env)


def blocks_of(graph: Graph) -> BlockInfo | None:
    """The transformer blocks the token and layer knobs act on (fusing first if needed), or None."""
    try:
        return require_blocks(graph, "budget")
    except NnforgeError:
        return None


@dataclass
class Space:
    """The candidate values of each knob; a knob with one value is not searched."""

    merge_r: list[int]
    prune_keep: list[float]
    skip: list[int]
    quantize: list[str]
    sparsity: list[float]
    blocks: int = 0  # transformer blocks found (0: the token and layer knobs do not apply)

    def settings(self) -> list[Setting]:
        """Every combination, weakest first."""
        combos = itertools.product(self.merge_r, self.prune_keep, self.skip, self.quantize, self.sparsity)
        return sorted(
            (Setting(r, k, s, q, sp) for r, k, s, q, sp in combos),
            key=lambda s: (s.merge_r + s.skip, -s.prune_keep, s.sparsity, QUANT.index(s.quant)),
        )

    def describe(self) -> str:
        knobs = [
            ("merge r", self.merge_r),
            ("prune keep", self.prune_keep),
            ("skip", self.skip),
            ("sparsity", self.sparsity),
            ("quantize", self.quantize),
        ]
        text = "; ".join(
            f"{name} {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"
            for name, values in knobs
            if len(values) > 1
        )
        text = text or "a single setting"
        if not self.blocks:
            text += " (no transformer blocks: token and layer settings do not apply)"
        return text


def default_space(graph: Graph, budget: Budget, batch, backend: str | None = None) -> Space:
    """Candidate knobs from the model: with transformer blocks, merging up to 3/4 of the tokens, keep ratios and up
    to half the blocks skipped; sparsity (by default only without blocks, ``DEFAULT_SPARSITY`` for ``backend``);
    the quantizations worth timing on ``backend``. A Budget's explicit lists replace the defaults."""
    info = blocks_of(graph)
    quants = list(budget.quantize) if budget.quantize is not None else list(DEFAULT_QUANT.get(backend, QUANT))
    for q in quants:
        if q not in QUANT:
            raise NnforgeError(f"budget: quantize must list values of {QUANT}, got {q!r}")
    if budget.sparsity is not None:
        ratios = sorted({float(r) for r in budget.sparsity})
    else:
        ratios = [0.0] if info is not None else list(DEFAULT_SPARSITY.get(backend, SPARSITY))
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise NnforgeError(f"budget: sparsity must list fractions in [0, 1), got {r!r}")
    if info is None:
        asked = [
            k
            for k, v, off in (
                ("merge_r", budget.merge_r, 0),
                ("prune_keep", budget.prune_keep, 1.0),
                ("skip", budget.skip, 0),
            )
            if v is not None and any(x != off for x in v)
        ]
        if asked:
            why = "; ".join(find_blocks(graph).notes) or "no attention op in the graph"
            raise NnforgeError(
                f"budget: {', '.join(asked)} act on transformer blocks, and this model has none ({why}); "
                "search quantize= and sparsity= only"
            )
        return Space([0], [1.0], [0], quants, ratios)
    n = len(info.blocks)
    if budget.merge_r is not None:
        rs = list(budget.merge_r)
    elif info.kind == "decoder":
        rs = [0]
    else:
        free = _tokens(info, graph, batch) - info.class_tokens
        top = max(1, (3 * free) // (4 * n))
        rs = sorted({0, *(max(1, round(top * f)) for f in (0.25, 0.5, 0.75, 1.0))})
    keeps = list(budget.prune_keep) if budget.prune_keep is not None else [1.0, 0.9, 0.7, 0.5]
    skips = list(budget.skip) if budget.skip is not None else list(range(0, max(1, n // 2) + 1))
    return Space(rs, keeps, skips, quants, ratios, blocks=n)


def build(graph: Graph, setting: Setting, calibration) -> Graph:
    g = graph.copy()
    ctx = PassContext(calibration=calibration, sample_inputs=list(calibration[0]))
    for p in setting.passes():
        res = p.run(g, ctx)
        g = res.graph if res.graph is not None else g
    return g


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]budget search"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _quality(graph: Graph, setting: Setting, calibration, metric, run, ref_cal) -> tuple:
    """(built graph, calibration drop, error): one candidate's quality, the same here or in a Ray task."""
    try:  # too strong for these inputs (e.g. merging more tokens than a sequence has) fails here
        g = build(graph, setting, calibration)
        return g, quality_drop(metric, outputs(g, calibration, run), ref_cal), ""
    except (NnforgeError, ValueError) as e:
        return None, None, str(e)


def _judge(c: Candidate, failed: list, budget: Budget, g, drop, error) -> Graph | None:
    """Note a candidate's quality; the graph when it is within the calibration budget (else it joins ``failed``)."""
    c.drop, c.error = drop, error
    if error or drop > budget.margin * budget.max_drop:
        failed.append(c.setting)
        return None
    return g


def _timed(c: Candidate, time_fn, g: Graph) -> bool:
    try:
        c.seconds = time_fn(g)
        return True
    except NnforgeError as e:  # e.g. a quantized op this backend cannot build
        c.error = str(e)
        return False


def _time_or_error(time_fn, g: Graph):
    try:
        return time_fn(g)
    except NnforgeError as e:
        return e


def _search_on_ray(graph, budget, cands, calibration, metric, run, ref_cal, time_fn, graphs, progress) -> None:
    """The candidates' qualities as Ray tasks, as many at once as the cluster has CPUs, in the serial order; a
    setting stronger than one found over budget is not submitted. The serial decisions are then replayed over
    the results in order, so every candidate gets the serial search's figure (or its "not evaluated"), and
    the candidates within budget are timed as Ray tasks."""
    over: list[Setting] = []

    def note(k: int, res: tuple) -> None:
        _, drop, error = res
        if error or drop > budget.margin * budget.max_drop:
            over.append(cands[k].setting)

    results = scale.map_items(
        functools.partial(_quality, graph, calibration=calibration, metric=metric, run=run, ref_cal=ref_cal),
        [c.setting for c in cands],
        "budget search: quality",
        budget.executor or "ray",
        progress,
        skip=lambda k: any(cands[k].setting.dominates(f) for f in over),
        on_result=note,
    )
    failed: list[Setting] = []
    within = []
    for c, res in zip(cands, results):
        if any(c.setting.dominates(f) for f in failed):
            continue  # a setting dominating one over budget comes after it in the order: skipped there too
        g = _judge(c, failed, budget, *res)
        if g is not None:
            within.append((c, g))
    times = scale.map_items(
        functools.partial(_time_or_error, time_fn),
        [g for _, g in within],
        "budget search: timing",
        budget.executor or "ray",
        progress,
    )
    for (c, g), t in zip(within, times):
        if isinstance(t, NnforgeError):
            c.error = str(t)
        else:
            c.seconds = t
            graphs[c.setting] = g


def search(
    graph: Graph,
    budget: Budget,
    calibration: Sequence[Sequence[np.ndarray]],
    heldout: Sequence[Sequence[np.ndarray]],
    time_fn: Callable[[Graph], float] | None = None,
    run=interpret,
    progress: bool = False,
    backend: str | None = None,
) -> BudgetResult:
    """The fastest setting within ``budget``; see the module docstring. ``backend``: the one ``time_fn``
    builds with (it picks the default quantization choices)."""
    if not calibration or not heldout:
        raise NnforgeError("budget: needs calibration batches and held-out batches (kept apart)")
    metric = metric_fn(budget.metric)
    time_fn = time_fn or flop_time(list(calibration[0]))
    space = default_space(graph, budget, calibration[0], backend)
    cands = [Candidate(s) for s in space.settings()]
    ref_cal, graphs = outputs(graph, calibration, run), {}
    failed: list[Setting] = []
    if scale.wants_ray(budget.executor):
        _search_on_ray(graph, budget, cands, calibration, metric, run, ref_cal, time_fn, graphs, progress)
    else:
        bar = _progress(progress, len(cands))
        if bar:
            bar.start()
            task = bar.add_task("", total=len(cands))
        try:
            for c in cands:
                if bar:
                    bar.update(task, advance=1, description=str(c.setting))
                if any(c.setting.dominates(f) for f in failed):
                    continue  # stronger than a setting already over budget
                g = _judge(c, failed, budget, *_quality(graph, c.setting, calibration, metric, run, ref_cal))
                if g is not None and _timed(c, time_fn, g):
                    graphs[c.setting] = g
        finally:
            if bar:
                bar.stop()
    lossless = next((c for c in cands if c.setting.lossless and c.seconds is not None), None)
    baseline = lossless.seconds if lossless is not None else time_fn(graph)  # timed like the others
    ref_held = outputs(graph, heldout, run)
    for c in sorted((c for c in cands if c.setting in graphs and c.seconds < baseline), key=lambda c: c.seconds):
        c.heldout_drop = quality_drop(metric, outputs(graphs[c.setting], heldout, run), ref_held)
        if c.heldout_drop <= budget.max_drop:
            return BudgetResult(c.setting, graphs[c.setting], c.heldout_drop, c.seconds, baseline, budget, cands, space)
    return BudgetResult(Setting(), graph.copy(), 0.0, baseline, baseline, budget, cands, space)


def plot_pareto(result: BudgetResult, path) -> None:
    """Speed-up vs quality drop of every measured candidate, the budget line and the chosen setting (PNG/SVG/PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(c.drop, result.baseline_seconds / c.seconds, str(c.setting)) for c in result.candidates if c.seconds]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label="candidates (calibration)")
        front, best = [], -1.0
        for d, s, _ in sorted(pts):
            if s > best:
                front.append((d, s))
                best = s
        ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", alpha=0.6, label="Pareto front")
    ax.axvline(result.budget.max_drop, color="gray", linestyle="--", label="budget")
    ax.scatter([result.drop], [result.speedup], marker="*", s=160, color="red", label=f"chosen: {result.setting}")
    ax.set_xlabel("quality drop")
    ax.set_ylabel("speed-up over lossless")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
