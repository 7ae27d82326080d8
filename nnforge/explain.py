"""Coverage dry run: which backend takes which op, and what would fall back, before compiling.

``nnforge.explain(model, inputs, target="cpu")`` imports the model, runs the lossless pipeline
(no checks, nothing is built), asks every backend of the target (and the torch executor) which
nodes it takes, plans the partitions ``compile`` would make (``partition.plan_for``, the planning
half of the plan-and-build step), and prints it all with the model's source lines. ``nnforge explain model.onnx --target cpu`` does the same from the shell.
"""

from __future__ import annotations

import inspect
import linecache
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from .backends.base import get_backend
from .ir import Graph
from .partition import DEFAULT_MIN_BLOCK_SIZE, FALLBACK, BuildSettings, PartitionPlan, plan_for

_SOURCE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+)")


@dataclass
class NodeRow:
    index: int
    op: str  # "torch_op" shows as the torch call it keeps, e.g. "aten.cumsum.default"
    value: str
    source: str
    code: str  # the source line's text, when the file is known
    verdicts: dict[str, str]  # backend -> "" (takes it) or the reason it does not
    partition: str  # e.g. "p1 torch"


@dataclass
class Explanation:
    model: str
    target: str
    backend: str
    pipeline: str
    rows: list[NodeRow]
    plan: PartitionPlan | None  # None when the chosen backend takes every node
    backends: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def fallback(self) -> list[NodeRow]:
        """Rows the chosen backend does not run (another backend of the fallback chain does)."""
        return [r for r in self.rows if r.partition and not r.partition.endswith(" " + self.backend)]

    def __str__(self) -> str:
        return self.text


def _op_label(node) -> str:
    return node.attrs["target"] if node.op == "torch_op" else node.op


def _source_files(model) -> dict[str, str]:
    """basename -> path of the files that define the model's modules (to quote its source lines)."""
    out: dict[str, str] = {}
    modules = model.modules() if hasattr(model, "modules") else []
    for m in modules:
        try:
            path = inspect.getsourcefile(type(m))
        except (TypeError, OSError):
            continue
        if path:
            out.setdefault(os.path.basename(path), path)
    return out


def _code(source: str, files: dict[str, str]) -> str:
    m = _SOURCE.match(source or "")
    if not m or m["file"] not in files:
        return ""
    return linecache.getline(files[m["file"]], int(m["line"])).strip()


def _verdicts(graph: Graph, target, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """backend -> {value name of a node's first output: reason it is not taken}."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            problems = get_backend(name).supports(graph, target)
        except Exception as e:  # an optional backend that does not import here: say so in every row
            reason = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
            out[name] = {n.outputs[0].name: reason for n in graph.nodes if n.outputs}
            continue
        out[name] = {}
        for u in problems:
            out[name].setdefault(u.node, u.reason)
    return out


def explain(
    model,
    example_inputs=None,
    target="cpu",
    *,
    backend: str | None = None,
    pipeline="O2",
    dynamic_shapes=None,
    input_names=None,
    min_block_size: int = DEFAULT_MIN_BLOCK_SIZE,
    file=None,
    quiet: bool = False,
) -> Explanation:
    """Print (to ``file``, default stdout; nothing when ``quiet``) and return the coverage report for ``model``."""
    from .api import import_model
    from .passes.manager import PassManager

    settings = BuildSettings.resolve(target, backend, min_block_size=min_block_size)
    tgt, chosen = settings.target, settings.backend
    graph = import_model(model, example_inputs, dynamic_shapes, input_names, opaque=True)
    graph = PassManager(pipeline).run(graph)
    names = list(dict.fromkeys(list(tgt.backends) + [FALLBACK]))
    verdicts = _verdicts(graph, tgt, names)
    plan = plan_for(graph, settings) if verdicts[chosen] else None  # None: the backend takes every node
    where = {}
    if plan is not None:
        where = {k: f"p{j} {p.backend}" for j, p in enumerate(plan.partitions) for k in p.nodes}
    files = _source_files(model)
    rows = []
    for k, n in enumerate(graph.nodes):
        key = n.outputs[0].name if n.outputs else ""
        rows.append(
            NodeRow(
                k,
                _op_label(n),
                key,
                n.source,
                _code(n.source, files),
                {b: verdicts[b].get(key, "") for b in names},
                where.get(k, f"p0 {chosen}"),
            )
        )
    exp = Explanation(
        getattr(graph, "name", "model"),
        tgt.name,
        chosen,
        pipeline if isinstance(pipeline, str) else "custom",
        rows,
        plan,
        names,
    )
    exp.text = _render(exp)
    if not quiet:
        print(exp.text, file=file or sys.stdout)
    return exp


def _render(exp: Explanation) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    table = Table(
        title=f"nnforge explain: {exp.model} for {exp.target} (backend {exp.backend}, pipeline {exp.pipeline})"
    )
    for col in ["#", "op", "value"] + exp.backends + ["partition", "source"]:
        table.add_column(col, overflow="fold")
    for r in exp.rows:
        marks = ["yes" if not r.verdicts[b] else "no" for b in exp.backends]
        src = r.source + (f"\n  {r.code}" if r.code else "")
        table.add_row(*(Text(c) for c in [str(r.index), r.op, r.value, *marks, r.partition, src]))
    console.print(table)
    say = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731  (reasons hold [brackets])
    say(_coverage(exp))
    if exp.plan is None:
        say(f"{exp.backend} takes every node: no partitioning, nothing falls back.")
    else:
        say(str(exp.plan))
        falls = exp.fallback
        where = Counter(r.partition.split()[-1] for r in falls)
        say(
            f"falls back: {len(falls)} of {len(exp.rows)} node(s)"
            + (f" ({', '.join(f'{b} {n}' for b, n in where.items())})" if falls else "")
        )
        for r in falls:
            why = r.verdicts[exp.backend] or exp.plan.reasons.get(r.index, "")
            line = f"  #{r.index} {r.op} (%{r.value})" + (f" at {r.source}" if r.source else "") + f": {why}"
            say(line + (f"\n      {r.code}" if r.code else ""))
    return console.export_text()


def _coverage(exp: Explanation) -> str:
    """One line per distinct op: how many nodes, and which backends take all of them."""
    ops: dict[str, list[NodeRow]] = {}
    for r in exp.rows:
        ops.setdefault(r.op, []).append(r)
    lines = ["op coverage:"]
    for op, rows in sorted(ops.items()):
        takes = [f"{b} {'yes' if all(not r.verdicts[b] for r in rows) else 'NO'}" for b in exp.backends]
        reasons = sorted({r.verdicts[b] for r in rows for b in exp.backends if r.verdicts[b]})
        lines.append(f"  {op:28s} x{len(rows):<4d} " + ", ".join(takes) + (f"   ({reasons[0]})" if reasons else ""))
    return "\n".join(lines)
