"""CompiledModel: the callable that ``nnforge.compile`` returns and ``nnforge.load`` restores."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from .backends.base import Artifact, run_artifact
from .bundle import write_bundle
from .ir import Graph, bind_symbols
from .passes.manager import PassRecord


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


class CompiledModel:
    """Call it like the model: torch tensors in, torch tensors out (numpy in, numpy out).

    Thread-safety: calls may come from several threads at once and give the same results as serial
    calls. ONNX Runtime sessions, the torch executor and partitioned models run concurrently; an
    artifact that is not thread-safe (``Artifact.thread_safe`` False, e.g. TVM's Relax VM) is called
    one thread at a time (``backends.base.run_artifact``).
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        records: Sequence[PassRecord] = (),
        accuracy: dict | None = None,
        compile_seconds: float | None = None,
        source_graph: Graph | None = None,
        pipeline: str = "",
        notes: Sequence[str] = (),
    ):
        self.artifact = artifact
        self.records = list(records)
        self.accuracy = dict(accuracy or {})
        self.compile_seconds = compile_seconds
        self.source_graph = source_graph
        self.pipeline = pipeline
        self.notes = list(notes)  # e.g. the budget search's choice
        self.cache_key: str | None = None  # set when it went into or came out of the compile cache
        self.from_cache = False

    @property
    def graph(self) -> Graph:
        return self.artifact.graph

    @property
    def target(self) -> str:
        return self.artifact.target.name

    @property
    def backend(self) -> str:
        return self.artifact.backend

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """numpy in, list of numpy out; checks names, ranks, dtypes and shapes first."""
        arrays = [to_numpy(x) for x in inputs]
        bind_symbols(self.graph, arrays)  # ValueError naming the input on a wrong rank/dtype/shape
        return run_artifact(self.artifact, arrays)  # serialized for artifacts that are not thread-safe

    def __call__(self, *args):
        outs = self.run(args)
        if any(hasattr(a, "detach") for a in args):
            import torch

            outs = [torch.from_numpy(np.require(o, requirements="C")) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, directory) -> None:
        write_bundle(
            self.artifact,
            directory,
            extra={
                "pipeline": self.pipeline,
                "passes": [asdict(r) for r in self.records],
                "accuracy": self.accuracy,
                "notes": self.notes,
            },
        )

    def report(self) -> str:
        """The pass table (time, node counts, error) and the accuracy traded, as text."""
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"nnforge: {self.graph.name} -> {self.backend} on {self.target} (pipeline {self.pipeline or '?'})"
        )
        for col in ("pass", "lossy", "time ms", "nodes before", "nodes after", "max error"):
            table.add_column(col, justify="left" if col == "pass" else "right")
        for r in self.records:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            table.add_row(
                r.name, "yes" if r.lossy else "", f"{r.seconds * 1e3:.1f}", str(r.nodes_before), str(r.nodes_after), err
            )
        console = Console(record=True, width=110, file=open("/dev/null", "w"))
        console.print(table)
        if self.accuracy:
            parts = [f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in self.accuracy.items()]
            console.print("accuracy traded: " + ", ".join(parts))
        for note in self.notes:
            console.print(note)
        if self.compile_seconds is not None:
            console.print(f"compile time: {self.compile_seconds:.2f} s")
        return console.export_text()

    def __repr__(self) -> str:
        return f"<CompiledModel {self.graph.name} target={self.target} backend={self.backend}>"
