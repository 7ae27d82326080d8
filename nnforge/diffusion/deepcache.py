"""DeepCache (Ma et al., 2023): reuse a U-Net's deep features across steps, recompute only the shallow path.

A U-Net's decoder concatenates each up-sampled feature with a skip feature from the encoder. In the IR that
is a ``concat`` on the channel axis of a **deep** value (from the up path) and a **skip** value that is one
of the deep value's ancestors (the encoder produced it before going deeper). ``find_skips`` lists these
concats from the output backwards: skip 0 is the last one, at full resolution, reading the first encoder
feature. ``DeepCache(branch=k)`` reuses the deep input of skip ``k``: the cached graph keeps only the
encoder layers up to that skip feature and the decoder layers after the concat (``stepcache.split``
removes the rest), and the full graph runs every ``interval`` steps (or at the steps of ``schedule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph, Node, Value
from ..passes.blocks import _ancestors


@dataclass
class Skip:
    index: int  # 0: the concat nearest the output
    concat: Node
    deep: Value  # from the decoder: what DeepCache reuses
    skip: Value  # from the encoder


def find_skips(graph: Graph) -> list[Skip]:
    """The U-Net's skip concats, nearest the output first (empty when the graph has none)."""
    found = []
    for node in reversed(graph.nodes):
        if node.op != "concat" or len(node.inputs) != 2 or node.output.type.rank != 4:
            continue
        if node.attrs.get("axis") not in (1, -3):
            continue
        a, b = node.inputs
        if b in _ancestors(a):
            deep, skip = a, b
        elif a in _ancestors(b):
            deep, skip = b, a
        else:
            continue
        found.append(Skip(len(found), node, deep, skip))
    return found


def format_skips(skips: Sequence[Skip]) -> str:
    if not skips:
        return "no U-Net skip connections found"
    return "\n".join(
        f"skip {s.index}: concat %{s.concat.output.name} of deep %{s.deep.name} {s.deep.type} "
        f"and skip %{s.skip.name} {s.skip.type}"
        for s in skips
    )


def nonuniform_steps(steps: int, full: int, power: float = 2.0) -> list[int]:
    """``full`` step indices out of ``steps``, denser at the start (high noise, where the layout forms):
    ``round((k / (full-1)) ** power * (steps-1))``, made distinct."""
    if full >= steps:
        return list(range(steps))
    picked: list[int] = []
    for k in np.linspace(0, 1, full) ** power * (steps - 1):
        s = int(round(k))
        while s in picked:
            s += 1
        picked.append(min(s, steps - 1))
    return sorted(set(picked))


@dataclass(frozen=True)
class DeepCache:
    """Reuse the deep feature of skip ``branch`` (0: the shallowest) for ``interval - 1`` steps after each full step.

    ``schedule``: "uniform" (every ``interval``-th step runs the full graph) or "nonuniform" (as many full
    steps, placed by ``nonuniform_steps``, when the run's length is known), or an explicit list of step indices.
    """

    interval: int = 3
    branch: int = 0
    schedule: str | tuple = "uniform"

    def __post_init__(self):
        if self.interval < 1:
            raise NnforgeError(f"DeepCache: interval must be >= 1, got {self.interval}")
        if isinstance(self.schedule, str) and self.schedule not in ("uniform", "nonuniform"):
            raise NnforgeError(
                f"DeepCache: schedule is 'uniform', 'nonuniform' or a list of steps, not {self.schedule!r}"
            )

    @property
    def name(self) -> str:
        sched = (
            "" if self.schedule == "uniform" else f", {self.schedule if isinstance(self.schedule, str) else 'custom'}"
        )
        return f"DeepCache(N={self.interval}, branch={self.branch}{sched})"

    def features(self, graph: Graph) -> list[Value]:
        skips = find_skips(graph)
        if not skips:
            raise NnforgeError("DeepCache: found no U-Net skip connections (channel concats) in this graph")
        if not 0 <= self.branch < len(skips):
            raise NnforgeError(f"DeepCache: branch {self.branch} out of range, the U-Net has {len(skips)} skips")
        return [skips[self.branch].deep]

    def full_steps(self, steps: int | None) -> Callable[[int], bool]:
        if not isinstance(self.schedule, str):
            chosen = set(self.schedule) | {0}
            return chosen.__contains__
        if self.schedule == "nonuniform" and steps is not None:
            chosen = set(nonuniform_steps(steps, -(-steps // self.interval)))
            return chosen.__contains__
        return lambda step: step % self.interval == 0
