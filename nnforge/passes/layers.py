"""Layer skipping by block influence (ShortGPT): remove the blocks that change the residual stream least.

A block's influence on calibration data is ``1 - cos(input, output)`` of its residual stream,
averaged over tokens and batches. ``skip_layers`` removes the ``n`` least influential blocks
by wiring each one's input straight to its output's users (DCE drops the rest).

Configure by giving the settings to the pass: ``SkipLayersPass(SkipLayers(n=2))``. ``blocks=[...]``
skips those blocks without calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph, interpret, verify
from .blocks import BlockInfo, require_blocks
from .cleanup import DeadCodeElimination
from .manager import Pass, PassContext, PassOptions, PassResult, register_pass


@dataclass
class SkipLayers(PassOptions):
    n: int = 2
    blocks: list[int] | None = None  # skip exactly these (no calibration needed)

    pass_name = "skip_layers"


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def block_influence(
    graph: Graph, info: BlockInfo, batches: Sequence[Sequence[np.ndarray]], run=interpret
) -> list[float]:
    """1 - mean cosine(block input, block output) per block, over the calibration batches."""
    probe = graph.copy()
    by_name = {v.name: v for v in probe.all_values()}
    stream = [info.blocks[0].input] + [b.output for b in info.blocks]
    probe.outputs = [by_name[v.name] for v in stream]
    sums = np.zeros(len(info.blocks))
    for batch in batches:
        hs = run(probe, list(batch))
        sums += [1.0 - float(_cosine_rows(hs[i], hs[i + 1]).mean()) for i in range(len(info.blocks))]
    return list(sums / max(len(batches), 1))


def skip_blocks(graph: Graph, info: BlockInfo, skip: Sequence[int]) -> None:
    """Wire the stream around the given blocks (last first, so consecutive skips chain) and drop dead nodes."""
    for i in sorted(set(skip), reverse=True):
        b = info.blocks[i]
        graph.replace_all_uses(b.output, b.input)
    DeadCodeElimination().run(graph, PassContext())


def calibration_batches(ctx: PassContext, who: str) -> list[list[np.ndarray]]:
    if ctx.calibration:
        return [list(b) for b in ctx.calibration]
    if ctx.sample_inputs is not None:
        return [list(ctx.sample_inputs)]
    raise NnforgeError(
        f"{who}: needs calibration batches (ctx.calibration) or sample inputs to measure block influence"
    )


@register_pass
class SkipLayersPass(Pass):
    """Remove the n blocks with the least influence on calibration data (lossy)."""

    name = "skip_layers"
    lossy = True
    Options = SkipLayers
    requires = ("blocks",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        if not cfg.n and not cfg.blocks:
            return PassResult(False, {"skipped": []})
        info = require_blocks(graph, self.name)
        count = len(info.blocks)
        if cfg.blocks is not None:
            skip, influence = sorted(set(cfg.blocks)), None
        else:
            if not 0 <= cfg.n < count:
                raise NnforgeError(f"skip_layers: n={cfg.n} must leave at least one of the {count} blocks")
            influence = block_influence(graph, info, calibration_batches(ctx, self.name))
            skip = sorted(int(i) for i in np.argsort(influence, kind="stable")[: cfg.n])
        if any(not 0 <= i < count for i in skip) or len(skip) >= count:
            raise NnforgeError(f"skip_layers: cannot skip blocks {skip} of {count}")
        skip_blocks(graph, info, skip)
        verify(graph)
        stats = {"skipped": skip, "blocks": count}
        if influence is not None:
            stats["influence"] = [round(x, 6) for x in influence]
        return PassResult(True, stats)
