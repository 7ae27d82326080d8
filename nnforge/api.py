"""compile / export / load. ``compile`` is one straight path, a function per step:

import_step      model -> Imported (the IR graph, the graph as imported, example inputs)
plan_passes      pipeline + LossySettings -> PassPlan (checked for order when built)
optimize         lossless passes, then lossy passes or the budget search -> Optimized
partition.build  graph + BuildSettings -> Artifact: the plan-and-build step every build goes through
check_step       the artifact against the original model -> accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from . import partition
from .bundle import read_bundle
from .cache import compile_key
from .cache import enabled_by_default as cache_enabled
from .cache import lookup as cache_lookup
from .cache import store as cache_store
from .compiled import CompiledModel, to_numpy
from .errors import NnforgeError
from .ir import Graph, interpret
from .partition import DEFAULT_MIN_BLOCK_SIZE, BuildSettings
from .passes.manager import (
    Pass,
    PassContext,
    PassManager,
    PassOptions,
    PassRecord,
    check_order,
    max_rel_error,
    resolve_pipeline,
    split_after,
)

if TYPE_CHECKING:
    from .passes.budget import Budget, BudgetResult


@contextlib.contextmanager
def _status(enabled: bool):
    """A rich status line on stderr while long steps run; silent when disabled or not a terminal."""
    if not enabled:
        yield lambda msg: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("nnforge: starting") as status:
        yield lambda msg: status.update(f"nnforge: {msg}")


# ---------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------


def import_model(model, example_inputs=None, dynamic_shapes=None, input_names=None, opaque: bool = True) -> Graph:
    """Any supported model (torch module, ONNX path/bytes/ModelProto, IR Graph) -> IR Graph.

    ``opaque``: a torch module's ops that have no IR mapping are kept as ``torch_op`` nodes (run by
    the torch executor) instead of failing the import."""
    if isinstance(model, Graph):
        return model.copy()
    if isinstance(model, (str, os.PathLike, bytes)) or type(model).__name__ == "ModelProto":
        from .frontend.onnx import import_onnx

        return import_onnx(model)
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        from .frontend.torch import import_torch

        if example_inputs is None:
            raise NnforgeError("compiling a torch module needs example_inputs (a tuple of tensors)")
        return import_torch(
            model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names, opaque=opaque
        )
    raise NnforgeError(
        f"cannot compile a {type(model).__name__}: give a torch.nn.Module, an ONNX file path or an IR Graph"
    )


def sample_inputs(graph: Graph, size: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Inputs for checking when the caller gave none: symbols get ``size``; ints are 1, bools True."""
    rng = np.random.default_rng(seed)
    out = []
    for v in graph.inputs:
        shape = [d if isinstance(d, int) else size for d in v.shape]
        if v.dtype.startswith("float"):
            out.append(rng.standard_normal(shape).astype(v.dtype))
        elif v.dtype == "bool":
            out.append(np.ones(shape, bool))
        else:
            out.append(np.ones(shape, v.dtype))
    return out


@dataclass
class Imported:
    graph: Graph  # what the passes rewrite
    source: Graph  # the graph as imported, untouched (cache key, reference interpreter)
    examples: list[np.ndarray]  # the caller's example inputs, or sampled ones


def import_step(model, example_inputs=None, dynamic_shapes=None, input_names=None, opaque: bool = True) -> Imported:
    graph = import_model(model, example_inputs, dynamic_shapes, input_names, opaque=opaque)
    examples = [to_numpy(x) for x in example_inputs] if example_inputs is not None else sample_inputs(graph)
    return Imported(graph, graph.copy(), examples)


# ---------------------------------------------------------------------------------------
# passes: lossless, then lossy passes or the budget search
# ---------------------------------------------------------------------------------------


@dataclass
class LossySettings:
    """What ``compile`` may trade accuracy for, and the data it calibrates and checks on.

    ``tokens`` / ``layers`` / ``quantize`` / ``sparsity``: a settings object (TokenMerge, TokenPrune,
    SkipLayers, Quantize, Sparsity) or a list of them; ``budget``: a Budget that searches them
    instead; ``calibration`` / ``heldout``: batches, each a tuple of tensors or one tensor."""

    tokens: Any = None
    layers: Any = None
    quantize: Any = None
    sparsity: Any = None
    budget: Budget | None = None
    calibration: Sequence | None = None
    heldout: Sequence | None = None

    def configs(self) -> list[PassOptions]:
        """The settings objects, in the order their passes compose: layers, sparsity, tokens, quantize."""
        out = []
        for group in (self.layers, self.sparsity, self.tokens, self.quantize):
            for cfg in group if isinstance(group, (list, tuple)) else [group] if group is not None else []:
                if not isinstance(cfg, PassOptions):
                    raise NnforgeError(
                        f"{cfg!r} is not an nnforge lossy setting (TokenMerge, TokenPrune, SkipLayers, "
                        "Quantize, Sparsity)"
                    )
                out.append(cfg)
        return out

    @property
    def uses_data(self) -> bool:
        """Whether the result depends on data (settings, a budget, calibration) the compile cache key lacks."""
        return bool(self.configs()) or self.budget is not None or self.calibration is not None


def _lossy_settings(given: LossySettings | None, **keywords) -> LossySettings:
    used = {k: v for k, v in keywords.items() if v is not None}
    if given is None:
        return LossySettings(**used)
    if used:
        raise NnforgeError(
            f"give the lossy settings either as lossy=LossySettings(...) or as keywords ({', '.join(used)}), not both"
        )
    return given


@dataclass
class PassPlan:
    """The passes compile runs, in order, around the lossy step."""

    lossless: list[Pass]  # the pipeline, less what must follow the lossy step
    lossy: list[Pass]  # the lossy settings' passes and a cleanup (empty with a budget: the search picks them)
    after_lossy: list[Pass]  # pipeline passes that must follow the lossy step, and a cleanup

    @property
    def all(self) -> list[Pass]:
        return self.lossless + self.lossy + self.after_lossy


def plan_passes(pipeline: str | Sequence, lossy: LossySettings) -> PassPlan:
    """The pipeline's passes, with those that must run after the lossy passes (by their declared ordering,
    e.g. sink_slices breaks the blocks token passes read) moved behind the lossy step."""
    from .passes.budget import search_passes

    pipeline_passes = resolve_pipeline(pipeline)
    lossy_passes = [cfg.make_pass() for cfg in lossy.configs()]
    step = lossy_passes or (search_passes() if lossy.budget is not None else [])
    before, after = split_after(pipeline_passes, step)
    check_order(before + step + after)
    cleanup = resolve_pipeline(["dce"]) if lossy_passes else []
    return PassPlan(before, lossy_passes + cleanup, after + (resolve_pipeline(["cse", "dce"]) if after else []))


def _batches(calibration) -> list[list[np.ndarray]] | None:
    """Calibration data as a list of input lists: each batch a tuple of tensors, or one tensor."""
    if calibration is None:
        return None
    out = []
    for batch in calibration:
        items = batch if isinstance(batch, (tuple, list)) else (batch,)
        out.append([to_numpy(x) for x in items])
    return out


@dataclass
class Optimized:
    graph: Graph
    records: list[PassRecord]
    notes: list[str]  # e.g. the budget search's report


def optimize(
    imported: Imported,
    passes: PassPlan,
    lossy: LossySettings,
    settings: BuildSettings,
    *,
    check: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
    say: Callable[[str], None] = lambda msg: None,
) -> Optimized:
    """Run the lossless and lossy passes (or the budget search), then what must follow them."""
    ctx = PassContext(
        sample_inputs=imported.examples,
        calibration=_batches(lossy.calibration),
        target=settings.target,
        backend=settings.backend,
    )
    manager = PassManager(
        passes.lossless + passes.lossy, check=check, tolerance=tolerance, progress=lambda p: say(f"pass {p}")
    )
    graph = manager.run(imported.graph, ctx)
    records, notes = list(manager.records), []
    if lossy.budget is not None:
        result = budget_step(graph, lossy, settings, imported.examples, progress)
        graph = result.graph
        notes.append(result.report())
    if passes.after_lossy:
        tail = PassManager(passes.after_lossy, check=check, tolerance=tolerance)
        graph = tail.run(graph, ctx)
        records += tail.records
    return Optimized(graph, records, notes)


def budget_step(
    graph: Graph, lossy: LossySettings, settings: BuildSettings, examples, progress: bool = False
) -> BudgetResult:
    """The fastest lossy setting within ``lossy.budget``, each candidate built by the same plan-and-build
    step as the final model and timed when the target runs here."""
    from .passes.budget import flop_time, search, wall_time

    batches, heldout = _batches(lossy.calibration), _batches(lossy.heldout)
    if not batches:
        raise NnforgeError("budget: give calibration=batches (and optionally heldout=batches)")
    if heldout is None:
        if len(batches) < 2:
            raise NnforgeError("budget: needs at least two calibration batches, or heldout= batches kept apart")
        half = len(batches) // 2
        batches, heldout = batches[:half], batches[half:]
    if _runs_here(settings.target):
        candidate = dataclasses.replace(settings, options={})  # default build options: tuning each candidate takes long
        time_fn = wall_time(lambda g: partition.build(g, candidate).run, examples)
    else:  # cannot time a device we do not have: count FLOPs instead
        time_fn = flop_time(examples)
    return search(graph, lossy.budget, batches, heldout, time_fn=time_fn, progress=progress, backend=settings.backend)


# ---------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------


def compile(
    model,
    example_inputs: Sequence | None = None,
    target="cpu",
    *,
    pipeline: str | Sequence = "O2",
    backend: str | None = None,
    dynamic_shapes=None,
    input_names=None,
    check: bool = True,
    tolerance: float = 1e-4,
    options: dict | None = None,
    progress: bool | None = None,
    lossy: LossySettings | None = None,
    tokens=None,
    layers=None,
    quantize=None,
    sparsity=None,
    budget=None,
    calibration=None,
    heldout=None,
    fallback: bool = True,
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    cache: bool | None = None,
    tune: int = 0,
) -> CompiledModel:
    """Compile ``model`` for ``target``; returns a CompiledModel callable like the model.

    ``check`` runs the reference interpreter after every pass (naming the pass that broke
    numerics) and measures the compiled model's error against the original on the examples.
    Lossy settings (``lossy=LossySettings(...)``, or the keywords ``tokens``, ``layers``, ``quantize``,
    ``sparsity``, ``budget``, ``calibration``, ``heldout``) run after the lossless pipeline with the
    calibration batches; ``budget`` searches them for the fastest setting within an accuracy budget,
    timed on the target backend and checked on ``heldout`` batches (by default the second half of
    ``calibration``).

    ``fallback``: nodes the backend cannot take run on the torch executor, in partitions planned by
    ``nnforge.partition`` (backend partitions under ``min_block_size`` nodes stay on torch); with
    ``fallback=False`` such a model is refused with UnsupportedOpError instead. ``cache``: reuse a
    bundle from the compile cache (``nnforge.cache``; None = on unless ``NNFORGE_CACHE=0``); not
    used with lossy settings or passes, a budget or calibration data. ``tune``: MetaSchedule trials
    for the TVM backend's cpu kernels (0: default schedules only), with a database reused across
    runs (``nnforge.backends.tvm_tune``).
    """
    t0 = time.perf_counter()
    settings = BuildSettings.resolve(
        target, backend, options, tune=tune, fallback=fallback, min_block_size=min_block_size
    )
    lossy = _lossy_settings(
        lossy,
        tokens=tokens,
        layers=layers,
        quantize=quantize,
        sparsity=sparsity,
        budget=budget,
        calibration=calibration,
        heldout=heldout,
    )
    passes = plan_passes(pipeline, lossy)
    progress = os.isatty(2) if progress is None else progress
    with _status(progress) as say:
        say("importing the model")
        imported = import_step(model, example_inputs, dynamic_shapes, input_names, opaque=fallback)
        key = None
        if (
            (cache_enabled() if cache is None else cache)
            and not lossy.uses_data
            and not any(p.lossy for p in passes.all)
        ):
            key = compile_key(imported.source, passes.all, settings)
            hit = cache_lookup(key)
            if hit is not None:
                hit.source_graph, hit.compile_seconds = imported.source, time.perf_counter() - t0
                hit.notes.append(f"loaded from the compile cache ({key[:12]})")
                return hit
        optimized = optimize(
            imported, passes, lossy, settings, check=check, tolerance=tolerance, progress=progress, say=say
        )
        say(f"building with {settings.backend} for {settings.target.name}")
        artifact = partition.build(optimized.graph, settings)
        accuracy = {}
        if check and _runs_here(settings.target):
            say("checking the compiled model against the original")
            accuracy = check_step(artifact, model, example_inputs, imported)
    name = (pipeline if isinstance(pipeline, str) else "custom") + "".join(f"+{c.pass_name}" for c in lossy.configs())
    compiled = CompiledModel(
        artifact,
        records=optimized.records,
        accuracy=accuracy,
        compile_seconds=time.perf_counter() - t0,
        source_graph=imported.source,
        pipeline=name,
        notes=optimized.notes,
    )
    if key is not None:
        cache_store(key, compiled)
    return compiled


def check_step(artifact, model, example_inputs, imported: Imported) -> dict:
    """The built model's max relative error against the original (eager torch, else the interpreter)."""
    reference = _reference_outputs(model, example_inputs, imported.source, imported.examples)
    return {
        "max_rel_error": max_rel_error(reference, artifact.run(imported.examples)),
        "reference": "eager torch" if hasattr(model, "forward") else "interpreter",
    }


def _runs_here(target) -> bool:
    """cpu runs natively; arm (qemu) and wasm (Node) run emulated when their toolchains are installed."""
    if target.name == "cpu":
        return True
    if target.name in ("arm", "wasm"):
        from .runtime import edge

        needed = {
            "arm": ("aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-tvm-runtime"),
            "wasm": ("node", "onnxruntime-web"),
        }
        status = edge.toolchain_status()
        return all(status.get(t) for t in needed[target.name])
    return False


def _reference_outputs(model, example_inputs, source: Graph, examples) -> list[np.ndarray]:
    if hasattr(model, "forward") and example_inputs is not None:
        import torch

        with torch.no_grad():
            out = model(*example_inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [to_numpy(o) for o in outs]
    return interpret(source, examples)


def load(directory, target: str | None = None):
    """Restore a saved bundle (a CompiledModel, or a CompiledLM for a compile_lm bundle); refuses tampered
    bundles, newer formats and (if given) another target."""
    artifact, manifest = read_bundle(directory, expect_target=target)
    if "decoder" in manifest:
        from .llm.compiled import load_lm

        return load_lm(directory, artifact, manifest)
    from .passes.manager import PassRecord

    records = []
    for r in manifest.get("passes", []):
        with contextlib.suppress(TypeError):
            records.append(PassRecord(**r))
    return CompiledModel(
        artifact,
        records=records,
        accuracy=manifest.get("accuracy", {}),
        pipeline=manifest.get("pipeline", ""),
        notes=manifest.get("notes", []),
    )


def export(model, example_inputs=None, target="arm", out: str | os.PathLike = "nnforge-bundle", **kwargs) -> Path:
    """Compile for ``target`` and write a deployable bundle to ``out``; returns its path."""
    compiled = compile(model, example_inputs, target, **kwargs)
    compiled.save(out)
    return Path(out)
