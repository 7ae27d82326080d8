"""compile / export / load: frontend -> pass pipeline -> backend, with progress and an accuracy check."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends.base import get_backend
from .bundle import read_bundle
from .cache import compile_key, enabled_by_default as cache_enabled, lookup as cache_lookup, store as cache_store
from .compiled import CompiledModel, to_numpy
from .errors import NnforgeError, UnsupportedOpError
from .ir import Graph, interpret
from .passes.manager import PassContext, PassManager, max_rel_error
from .targets import get_target, resolve_backend


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


LATE_PASSES = ("sink_slices",)


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
        return import_torch(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names,
                            opaque=opaque)
    raise NnforgeError(f"cannot compile a {type(model).__name__}: give a torch.nn.Module, an ONNX file path or an IR Graph")


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


def _batches(calibration) -> list[list[np.ndarray]] | None:
    """Calibration data as a list of input lists: each batch a tuple of tensors, or one tensor."""
    if calibration is None:
        return None
    out = []
    for batch in calibration:
        items = batch if isinstance(batch, (tuple, list)) else (batch,)
        out.append([to_numpy(x) for x in items])
    return out


def _lossy_configs(*groups) -> list:
    """Flatten the lossy settings (a config, a list of configs, or None); each config names its pass."""
    out = []
    for g in groups:
        for cfg in (g if isinstance(g, (list, tuple)) else [g] if g is not None else []):
            if not hasattr(cfg, "pass_name"):
                raise NnforgeError(f"{cfg!r} is not an nnforge lossy setting (TokenMerge, TokenPrune, SkipLayers, "
                                   "Quantize, Sparsity)")
            out.append(cfg)
    return out


def compile(model, example_inputs: Sequence | None = None, target="cpu", *, pipeline: str | Sequence = "O2",
            backend: str | None = None, dynamic_shapes=None, input_names=None, check: bool = True,
            tolerance: float = 1e-4, options: dict | None = None, progress: bool | None = None,
            tokens=None, layers=None, quantize=None, sparsity=None, budget=None, calibration=None,
            heldout=None, fallback: bool = True, min_block_size: int = 3, cache: bool | None = None,
            tune: int = 0) -> CompiledModel:
    """Compile ``model`` for ``target``; returns a CompiledModel callable like the model.

    ``check`` runs the reference interpreter after every pass (naming the pass that broke
    numerics) and measures the compiled model's error against the original on the examples.
    Lossy settings (``tokens``, ``layers``, ``quantize``, ``sparsity``) run after the lossless
    pipeline with ``calibration`` batches; ``budget`` searches them for the fastest setting within
    an accuracy budget, timed on the target backend and checked on ``heldout`` batches (by default
    the second half of ``calibration``).

    ``fallback``: nodes the backend cannot take run on the torch executor, in partitions planned by
    ``nnforge.partition`` (backend partitions under ``min_block_size`` nodes stay on torch); with
    ``fallback=False`` such a model is refused with UnsupportedOpError instead. ``cache``: reuse a
    bundle from the compile cache (``nnforge.cache``; None = on unless ``NNFORGE_CACHE=0``); not
    used with lossy settings, a budget or calibration data. ``tune``: MetaSchedule trials for the
    TVM backend's cpu kernels (0: default schedules only), with a database reused across runs
    (``nnforge.backends.tvm_tune``).
    """
    t0 = time.perf_counter()
    tgt = get_target(target)
    backend_name = resolve_backend(tgt, backend)
    progress = os.isatty(2) if progress is None else progress
    if tune:
        if backend_name != "tvm":
            raise NnforgeError(f"tune={tune}: MetaSchedule tuning needs backend='tvm', not {backend_name!r}")
        options = {**(options or {}), "tune": tune}
    with _status(progress) as say:
        say("importing the model")
        graph = import_model(model, example_inputs, dynamic_shapes, input_names, opaque=fallback)
        source = graph.copy()
        examples = [to_numpy(x) for x in example_inputs] if example_inputs is not None else sample_inputs(graph)
        batches = _batches(calibration)
        lossy = _lossy_configs(layers, sparsity, tokens, quantize)  # the order they compose in
        opts = dict(options or {})
        opts.update({cfg.pass_name: cfg for cfg in lossy})
        passes = ([pipeline] if isinstance(pipeline, str) else list(pipeline)) + (
            [cfg.pass_name for cfg in lossy] + ["dce"] if lossy else [])
        manager = PassManager(passes, check=check, tolerance=tolerance, progress=lambda p: say(f"pass {p}"))
        # passes that change block structure (sink_slices trims the last block) wait until lossy passes found the blocks
        late = [p for p in manager.passes if p.name in LATE_PASSES] if lossy or budget is not None else []
        manager.passes = [p for p in manager.passes if p not in late]
        key = None
        if (cache_enabled() if cache is None else cache) and not lossy and budget is None and calibration is None:
            key = compile_key(source, manager.passes, backend_name, tgt.name, options, fallback, min_block_size)
            hit = cache_lookup(key)
            if hit is not None:
                hit.source_graph, hit.compile_seconds = source, time.perf_counter() - t0
                hit.notes.append(f"loaded from the compile cache ({key[:12]})")
                return hit
        ctx = PassContext(sample_inputs=examples, calibration=batches, target=tgt, backend=backend_name, options=opts)
        graph = manager.run(graph, ctx)
        be = get_backend(backend_name)
        notes = []
        if budget is not None:
            graph, note = _budget_search(graph, budget, batches, _batches(heldout), be, tgt, examples, progress)
            notes.append(note)
        if late:
            tail = PassManager(late + ["cse", "dce"], check=check, tolerance=tolerance)
            graph = tail.run(graph, ctx)
            manager.records += tail.records
        missing = be.supports(graph, tgt)
        if missing and not fallback:
            raise UnsupportedOpError([(f"{u.op}: {u.reason}", u.source) for u in missing], where=f"backend {backend_name}")
        say(f"building with {backend_name} for {tgt.name}")
        if missing:  # what the backend cannot take runs on the torch executor
            from .partition import build_partitioned

            artifact = build_partitioned(graph, tgt, backend_name, dict(options or {}), min_block_size)
        else:
            artifact = be.build(graph, tgt, dict(options or {}))
        accuracy = {}
        if check and _runs_here(tgt):
            say("checking the compiled model against the original")
            reference = _reference_outputs(model, example_inputs, source, examples)
            got = artifact.run(examples)
            accuracy = {"max_rel_error": max_rel_error(reference, got),
                        "reference": "eager torch" if hasattr(model, "forward") else "interpreter"}
    name = (pipeline if isinstance(pipeline, str) else "custom") + "".join(f"+{c.pass_name}" for c in lossy)
    compiled = CompiledModel(artifact, records=manager.records, accuracy=accuracy,
                             compile_seconds=time.perf_counter() - t0, source_graph=source, pipeline=name, notes=notes)
    if key is not None:
        cache_store(key, compiled)
    return compiled


def _budget_search(graph: Graph, budget, batches, heldout, be, tgt, examples, progress: bool):
    """Pick the fastest lossy setting within ``budget``, timed with the target backend when it runs here."""
    from .passes.budget import flop_time, search, wall_time

    if not batches:
        raise NnforgeError("budget: give calibration=batches (and optionally heldout=batches)")
    if heldout is None:
        if len(batches) < 2:
            raise NnforgeError("budget: needs at least two calibration batches, or heldout= batches kept apart")
        half = len(batches) // 2
        batches, heldout = batches[:half], batches[half:]
    if _runs_here(tgt):
        time_fn = wall_time(lambda g: be.build(g, tgt, {}).run, examples)
    else:  # cannot time a device we do not have: count FLOPs instead
        time_fn = flop_time(examples)
    result = search(graph, budget, batches, heldout, time_fn=time_fn, progress=progress, backend=be.name)
    return result.graph, result.report()


def _runs_here(target) -> bool:
    """cpu runs natively; arm (qemu) and wasm (Node) run emulated when their toolchains are installed."""
    if target.name == "cpu":
        return True
    if target.name in ("arm", "wasm"):
        from .runtime import edge

        needed = {"arm": ("aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-tvm-runtime"), "wasm": ("node", "onnxruntime-web")}
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


def load(directory, target: str | None = None) -> CompiledModel:
    """Restore a saved bundle; refuses tampered bundles, newer formats and (if given) another target."""
    artifact, manifest = read_bundle(directory, expect_target=target)
    from .passes.manager import PassRecord

    records = []
    for r in manifest.get("passes", []):
        with contextlib.suppress(TypeError):
            records.append(PassRecord(**r))
    return CompiledModel(artifact, records=records, accuracy=manifest.get("accuracy", {}),
                         pipeline=manifest.get("pipeline", ""), notes=manifest.get("notes", []))


def export(model, example_inputs=None, target="arm", out: str | os.PathLike = "nnforge-bundle", **kwargs) -> Path:
    """Compile for ``target`` and write a deployable bundle to ``out``; returns its path."""
    compiled = compile(model, example_inputs, target, **kwargs)
    compiled.save(out)
    return Path(out)
