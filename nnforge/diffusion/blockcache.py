"""FORA-style block caching for DiTs (Selvaraju et al., 2024) and T-Gate (Zhang et al., 2024), on the IR.

A transformer block adds its attention and MLP branches to a residual stream: ``h = x + branch(x, c)``.
In the imported graph that is an ``add`` of two values of the same shape where one (the stream) is an
ancestor of the other (the branch). ``residual_branches`` lists them in order, each marked whether its
branch contains attention. ``BlockCache`` (FORA) reuses the chosen blocks' branch outputs between full
steps: the cached graph keeps only the residual adds of those blocks (the embeddings and the final layer
still run each step). ``TGate`` finds the cross-attentions (an attention whose keys do not depend on the
sample) and freezes their output after step ``gate``: from then on the cached graph runs, without the
key/value/query projections and the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import NnforgeError
from ..ir import Graph, Node, Value
from ..passes.blocks import _between  # the same walk the block analysis uses

ATTENTION = ("sdpa", "attention")


@dataclass
class Branch:
    add: Node  # stream + branch
    stream: Value
    value: Value  # the branch's output: what block caching reuses
    attention: bool  # the branch contains an attention op


def residual_branches(graph: Graph) -> list[Branch]:
    """The residual adds on a ``[batch, tokens, hidden]`` stream, in graph order."""
    found = []
    for node in graph.nodes:
        if node.op != "add" or len(node.inputs) != 2 or node.output.type.rank != 3:
            continue
        a, b = node.inputs
        if a is None or b is None or a.shape != b.shape or graph.is_constant(a) or graph.is_constant(b):
            continue
        for stream, branch in ((a, b), (b, a)):
            nodes, reached = _between(branch, stream)
            if reached and len(nodes) > 2:
                found.append(Branch(node, stream, branch, any(n.op in ATTENTION for n in nodes)))
                break
    return found


def blocks_of(branches: list[Branch]) -> list[list[Branch]]:
    """Branches grouped into blocks: a new block starts at each self-attention branch."""
    blocks: list[list[Branch]] = []
    for b in branches:
        if b.attention and (not blocks or any(x.attention for x in blocks[-1]) and _closed(blocks[-1])):
            blocks.append([b])
        elif blocks:
            blocks[-1].append(b)
        else:
            blocks.append([b])
    return blocks


def _closed(block: list[Branch]) -> bool:
    """A block is complete once a branch without attention (its MLP) ends it."""
    return not block[-1].attention


def cross_attentions(graph: Graph) -> list[Node]:
    """Attention ops whose keys do not depend on the first input (the noisy sample): cross-attention."""
    sample = graph.inputs[0]
    out = []
    for node in graph.nodes:
        if node.op in ATTENTION and len(node.inputs) >= 2:
            nodes, reached = _between(node.inputs[1], sample)
            if not reached:
                out.append(node)
    return out


@dataclass(frozen=True)
class BlockCache:
    """FORA: reuse the attention and MLP outputs of transformer blocks ``blocks`` (default: all) for
    ``interval - 1`` steps after each full step."""

    interval: int = 2
    blocks: tuple | None = None

    def __post_init__(self):
        if self.interval < 1:
            raise NnforgeError(f"BlockCache: interval must be >= 1, got {self.interval}")

    @property
    def name(self) -> str:
        which = "all" if self.blocks is None else ",".join(map(str, self.blocks))
        return f"BlockCache(N={self.interval}, blocks={which})"

    def features(self, graph: Graph) -> list[Value]:
        blocks = blocks_of(residual_branches(graph))
        if not blocks:
            raise NnforgeError("BlockCache: found no transformer blocks (residual adds on a token stream)")
        chosen = range(len(blocks)) if self.blocks is None else self.blocks
        bad = [k for k in chosen if not 0 <= k < len(blocks)]
        if bad:
            raise NnforgeError(f"BlockCache: block(s) {bad} out of range, the model has {len(blocks)}")
        return [b.value for k in chosen for b in blocks[k]]

    def full_steps(self, steps: int | None) -> Callable[[int], bool]:
        return lambda step: step % self.interval == 0


@dataclass(frozen=True)
class TGate:
    """T-Gate: cross-attention outputs computed up to step ``gate``, then frozen for the rest of the run."""

    gate: int = 10

    @property
    def name(self) -> str:
        return f"TGate(gate={self.gate})"

    def features(self, graph: Graph) -> list[Value]:
        found = cross_attentions(graph)
        if not found:
            raise NnforgeError("TGate: found no cross-attention (an attention whose keys do not read the sample)")
        return [n.output for n in found]

    def full_steps(self, steps: int | None) -> Callable[[int], bool]:
        return lambda step: step < self.gate
