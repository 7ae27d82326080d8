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


def import_model(model, example_inputs=None, dynamic_shapes=None, input_names=None) -> Graph:
    """Any supported model (torch module, ONNX path/bytes/ModelProto, IR Graph) -> IR Graph."""
    if isinstance(model, Graph):
        return model.copy()
    if isinstance(model, (str, os.PathLike, bytes)) or type(model).__name__ == "ModelProto":
        from .frontend.onnx import import_onnx

        return import_onnx(model)
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        from .frontend.torch import import_torch

        if example_inputs is None:
            raise NnforgeError("compiling a torch module needs example_inputs (a tuple of tensors)")
        return import_torch(model, tuple(example_inputs), dynamic_shapes=dynamic_shapes, input_names=input_names)
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


def compile(model, example_inputs: Sequence | None = None, target="cpu", *, pipeline: str | Sequence = "O2",
            backend: str | None = None, dynamic_shapes=None, input_names=None, check: bool = True,
            tolerance: float = 1e-4, options: dict | None = None, progress: bool | None = None) -> CompiledModel:
    """Compile ``model`` for ``target``; returns a CompiledModel callable like the model.

    ``check`` runs the reference interpreter after every pass (naming the pass that broke
    numerics) and measures the compiled model's error against the original on the examples.
    """
    t0 = time.perf_counter()
    tgt = get_target(target)
    backend_name = resolve_backend(tgt, backend)
    progress = os.isatty(2) if progress is None else progress
    with _status(progress) as say:
        say("importing the model")
        graph = import_model(model, example_inputs, dynamic_shapes, input_names)
        source = graph.copy()
        examples = [to_numpy(x) for x in example_inputs] if example_inputs is not None else sample_inputs(graph)
        manager = PassManager(pipeline, check=check, tolerance=tolerance, progress=lambda p: say(f"pass {p}"))
        graph = manager.run(graph, PassContext(sample_inputs=examples, target=tgt, backend=backend_name,
                                               options=dict(options or {})))
        be = get_backend(backend_name)
        missing = be.supports(graph, tgt)
        if missing:
            raise UnsupportedOpError([(f"{u.op}: {u.reason}", u.source) for u in missing], where=f"backend {backend_name}")
        say(f"building with {backend_name} for {tgt.name}")
        artifact = be.build(graph, tgt, dict(options or {}))
        accuracy = {}
        if check and _runs_here(tgt):
            say("checking the compiled model against the original")
            reference = _reference_outputs(model, example_inputs, source, examples)
            got = artifact.run(examples)
            accuracy = {"max_rel_error": max_rel_error(reference, got),
                        "reference": "eager torch" if hasattr(model, "forward") else "interpreter"}
    return CompiledModel(artifact, records=manager.records, accuracy=accuracy, compile_seconds=time.perf_counter() - t0,
                         source_graph=source, pipeline=pipeline if isinstance(pipeline, str) else "custom")


def _runs_here(target) -> bool:
    return target.name == "cpu"


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
                         pipeline=manifest.get("pipeline", ""))


def export(model, example_inputs=None, target="arm", out: str | os.PathLike = "nnforge-bundle", **kwargs) -> Path:
    """Compile for ``target`` and write a deployable bundle to ``out``; returns its path."""
    compiled = compile(model, example_inputs, target, **kwargs)
    compiled.save(out)
    return Path(out)
