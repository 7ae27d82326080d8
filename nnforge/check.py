"""Differential check: the same inputs through eager torch, the interpreter and each backend.

``nnforge.check(model, inputs)`` returns a CheckReport whose table lists, per runner and output,
the max relative error against the reference (eager torch for a torch module, else the
interpreter). A runner that fails is listed with its error instead of aborting the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx

from .compiled import to_numpy
from .passes.manager import max_rel_error


@dataclass
class CheckRow:
    runner: str
    errors: list[float] = field(default_factory=list)  # per output, vs the reference
    failure: str = ""


@dataclass
class CheckReport:
    reference: str
    output_names: list[str]
    rows: list[CheckRow]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(not r.failure and all(e <= self.tolerance for e in r.errors) for r in self.rows)

    def worst(self, runner: str) -> float:
        row = next(r for r in self.rows if r.runner == runner)
        return float("inf") if row.failure else max(row.errors, default=0.0)

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"nnforge check: max relative error vs {self.reference} (tolerance {self.tolerance:g})")
        table.add_column("runner")
        for name in self.output_names:
            table.add_column(name, justify="right")
        table.add_column("status")
        for r in self.rows:
            cells = [f"{e:.1e}" for e in r.errors] or ["-"] * len(self.output_names)
            status = (
                f"failed: {r.failure}"
                if r.failure
                else ("ok" if all(e <= self.tolerance for e in r.errors) else "MISMATCH")
            )
            table.add_row(r.runner, *cells, status)
        console = Console(record=True, width=140, file=open("/dev/null", "w"))
        console.print(table)
        return console.export_text()


def check(
    model,
    example_inputs: Sequence | None = None,
    targets: Sequence[str] = ("cpu",),
    backends: Sequence[str] | None = None,
    pipeline: str = "O2",
    dynamic_shapes=None,
    tolerance: float = 1e-4,
) -> CheckReport:
    """Run eager (if torch), the interpreter on the imported and on the optimised graph, and every
    backend that can build for each target and run here; compare all with the reference."""
    from .api import compile as nf_compile
    from .api import import_model, sample_inputs
    from .ir import interpret
    from .passes.manager import PassManager
    from .targets import get_target

    graph = import_model(model, example_inputs, dynamic_shapes)
    arrays = [to_numpy(x) for x in example_inputs] if example_inputs is not None else sample_inputs(graph)
    rows: list[CheckRow] = []
    if hasattr(model, "forward"):
        import torch

        with torch.no_grad():
            out = model(*example_inputs)
        reference = [to_numpy(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]
        ref_name = "eager torch"
        rows.append(CheckRow("eager torch", [0.0] * len(reference)))
    elif isinstance(model, (str, bytes, os.PathLike, onnx.ModelProto)):
        # an ONNX file: ONNX Runtime on the file as is is the reference, so importer mistakes show too
        from .backends.onnxrt import run_onnx_directly

        reference, ref_name = None, "onnxruntime (the file as is)"
        try:
            reference = [to_numpy(o) for o in run_onnx_directly(model, arrays)]
            rows.append(CheckRow(ref_name, [0.0] * len(reference)))
        except Exception as e:  # noqa: BLE001 - ORT refusing the file is a row, the interpreter becomes the reference
            rows.append(CheckRow(ref_name, failure=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            ref_name = "interpreter"
    else:
        reference, ref_name = None, "interpreter"

    def add(name, fn):
        nonlocal reference
        try:
            got = fn()
        except Exception as e:  # report, keep checking the others
            rows.append(CheckRow(name, failure=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            return
        if reference is None:
            reference = got
        if len(got) != len(reference) or any(np.shape(g) != np.shape(r) for r, g in zip(reference, got)):
            shapes = [tuple(np.shape(g)) for g in got]
            rows.append(CheckRow(name, failure=f"outputs of shapes {shapes}, the reference's are {ref_shapes()}"))
            return
        rows.append(CheckRow(name, [max_rel_error([r], [g]) for r, g in zip(reference, got)]))

    def ref_shapes():
        return [tuple(np.shape(r)) for r in reference]

    add("interpreter (imported)", lambda: interpret(graph, arrays))
    add(f"interpreter ({pipeline})", lambda: interpret(PassManager(pipeline).run(graph.copy()), arrays))
    for t in targets:
        tgt = get_target(t)
        for be in backends or tgt.backends:
            if be not in tgt.backends:
                continue
            add(
                f"{be} on {tgt.name}",
                lambda be=be, tgt=tgt: nf_compile(
                    graph, arrays, tgt, backend=be, pipeline=pipeline, check=False, progress=False
                ).run(arrays),
            )
    names = [v.name for v in graph.outputs]
    return CheckReport(ref_name, names, rows, tolerance)
