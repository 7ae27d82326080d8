"""ToMe for diffusion (Bolya & Hoffman, 2023): merge tokens before a U-Net's or DiT's self-attention, unmerge after.

A self-attention reads its queries, keys and values from one token tensor ``x: [batch, h*w, hidden]`` (the normed
hidden states; in the IR: the latest value of that shape all three are computed from). The rewrite puts a
``grid_merge`` (nnforge/ops/merge.py) on ``x``: the projections and the attention then run on ``h*w - r`` tokens,
``r = ratio * h*w``; the attention's output, carried through the token-wise ops after it (the output projection,
a rescale, DiT's gate) while they stay ``[batch, tokens, hidden]``, is unmerged back to ``h*w`` tokens (a gather
by the merge's slots) before it meets the residual stream. Everything outside the attention branch keeps full size.

The token grid ``h x w`` is computed from the token count and the sample's spatial size: the tokens of a U-Net
level or of a DiT's patches are the sample's grid at an integer downsampling ``d`` (``h*w = H*W / d^2``, laid out
row-major, as diffusers flattens ``[B, C, H, W]``). ``max_downsample`` chooses where to merge: in the
self-attentions whose grid is at most that factor coarser than the finest self-attention grid of the model (1: only
the finest, as ToMe-SD's default at Stable Diffusion's 64x64 latents; a DiT's blocks all share one grid).

``DiffusionToMe(ratio=0.5)`` is a graph rewrite for ``compile_denoiser(..., cache=...)``, alone or with a step
cache (``cache=[DeepCache(interval=3), DiffusionToMe(0.5)]``), and a lossy pass (``diffusion_tome``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import NnforgeError
from ..ir import Graph, Node, Value, verify
from ..passes.blocks import TOKENWISE, _ancestors, prepare
from ..passes.manager import Pass, PassContext, PassOptions, PassResult, register_pass
from ..passes.tokens import retype
from .blockcache import ATTENTION, cross_attentions

MIN_TOKENS = 64  # the budget tries merging only where a self-attention has at least this many tokens (8x8)


@dataclass(frozen=True)
class DiffusionToMe(PassOptions):
    """Merge ``ratio`` of the tokens (at most the sources: 3/4 with stride 2x2) before each chosen self-attention,
    destinations on a ``stride`` x ``stride`` grid; ``max_downsample``: merge at grids up to that factor coarser than
    the finest self-attention grid. ratio 0 leaves the graph as it is."""

    ratio: float = 0.5
    stride: int = 2
    max_downsample: int = 1

    pass_name = "diffusion_tome"

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise NnforgeError(f"DiffusionToMe: ratio must be in [0, 1), got {self.ratio}")
        if self.stride < 1 or self.max_downsample < 1:
            raise NnforgeError(
                f"DiffusionToMe: stride and max_downsample must be >= 1, got {self.stride}, {self.max_downsample}"
            )

    @property
    def name(self) -> str:
        extra = (f", stride={self.stride}" if self.stride != 2 else "") + (
            f", max_downsample={self.max_downsample}" if self.max_downsample != 1 else ""
        )
        return f"ToMe(ratio={self.ratio:g}{extra})"

    def rewrite(self, graph: Graph) -> Graph:
        """A merged copy of ``graph`` (the graph itself when ratio is 0)."""
        if self.ratio == 0:
            return graph
        graph = graph.copy()
        merge_self_attention(graph, self)
        return graph


@dataclass
class Site:
    attention: Node
    tokens: int
    grid: tuple[int, int]
    x: Value  # what q, k and v are computed from
    path: list[Node]  # the nodes from x to the attention's inputs
    out: Value  # the last merged value after the attention: unmerged here


@dataclass
class MergeStats:
    merged: list[tuple[str, int, int]] = field(default_factory=list)  # (attention, tokens, r)
    notes: list[str] = field(default_factory=list)


def token_grid(tokens, sample_shape) -> tuple[int, int] | None:
    """The h x w grid of ``tokens`` tokens over a sample ``[..., H, W]`` at an integer downsampling, or None."""
    H, W = sample_shape[-2:]
    if not all(isinstance(d, int) for d in (tokens, H, W)) or tokens < 1:
        return None
    d = round(math.sqrt(H * W / tokens))
    if d >= 1 and H % d == 0 and W % d == 0 and (H // d) * (W // d) == tokens:
        return H // d, W // d
    return None


def self_attentions(graph: Graph) -> list[Node]:
    """Attention ops whose keys depend on the sample (cross-attentions excluded)."""
    cross = set(cross_attentions(graph))
    return [n for n in graph.nodes if n.op in ATTENTION and n not in cross]


def attention_tokens(node: Node):
    """Query tokens of an attention (``[b, n, hidden]``) or sdpa (``[b, heads, n, dim]``) op."""
    q = node.inputs[0]
    return q.shape[1] if node.op == "attention" else q.shape[-2]


def mergeable_tokens(graph: Graph) -> list[int]:
    """Token counts of the self-attentions, on a raw or fused graph (what the budget looks at)."""
    return [t for t in (attention_tokens(n) for n in self_attentions(graph)) if isinstance(t, int)]


def _site(att: Node, grid: tuple[int, int], users, index) -> Site | str:
    """Where to merge and unmerge around ``att``, or why not."""
    q, k, v = att.inputs[:3]
    n = q.shape[1]
    if len(att.inputs) > 3 and att.inputs[3] is not None:
        return "has an attention mask"
    if q.type.rank != 3 or not isinstance(n, int) or k.shape[1] != n or v.shape[1] != n:
        return f"queries/keys/values {q.shape}, {k.shape}, {v.shape} are not one static token set"
    ancestors = [_ancestors(t) for t in (q, k, v)]
    common = [
        a
        for a in ancestors[0] & ancestors[1] & ancestors[2]
        if a.producer is not None and a.type.rank == 3 and a.shape[:2] == q.shape[:2]
    ]
    if not common:
        return "no one token tensor that queries, keys and values are all computed from"
    x = max(common, key=lambda a: index[a.producer])
    forward, todo = set(), [x]  # nodes reachable from x up to the attention
    while todo:
        for u in users.get(todo.pop(), []):
            if u not in forward and index[u] < index[att]:
                forward.add(u)
                todo.extend(u.outputs)
    path = sorted(
        (nd for nd in forward if any(o in a for o in nd.outputs for a in ancestors)), key=lambda nd: index[nd]
    )
    odd = sorted({nd.op for nd in path} - TOKENWISE)
    if odd:
        return f"queries/keys/values are computed from %{x.name} through {', '.join(odd)}: not token-wise"
    out = att.output  # through the single-user token-wise ops after it, while they keep [batch, tokens, *]
    while True:
        us = users.get(out, [])
        if len(us) != 1 or us[0].op not in TOKENWISE or us[0].output.type.rank != 3:
            break
        u = us[0]
        if u.op == "add" and any(
            i is not out and i is not None and i.type.rank == 3 and i.shape[1] == n for i in u.inputs
        ):
            break  # the residual add: the stream is full size
        if u.output.shape[1] != n:
            break
        out = u.output
    return Site(att, n, grid, x, path, out)


def merge_self_attention(graph: Graph, cfg: DiffusionToMe) -> MergeStats:
    """Rewrite ``graph`` in place (fusing it first): grid_merge / unmerge around the chosen self-attentions."""
    stats = MergeStats()
    fused = prepare(graph)
    if fused is not graph:
        graph.__dict__.update(fused.__dict__)
    sample = graph.inputs[0]
    if sample.type.rank != 4:
        raise NnforgeError(f"diffusion ToMe: the first input must be the sample [batch, C, H, W], got {sample.shape}")
    atts = self_attentions(graph)
    if not atts:
        raise NnforgeError("diffusion ToMe: found no self-attention (an attention whose keys read the sample)")
    grids = {}
    for att in atts:
        if att.op != "attention":
            stats.notes.append(f"%{att.output.name}: sdpa not fused into attention, left alone")
            continue
        grid = token_grid(attention_tokens(att), sample.shape)
        if grid is None:
            stats.notes.append(
                f"%{att.output.name}: {attention_tokens(att)} tokens are no grid over the {sample.shape[-2:]} sample"
            )
            continue
        grids[att] = grid
    if not grids:
        return stats
    finest = max(h for h, _ in grids.values())
    users = graph.users()
    index = {nd: i for i, nd in enumerate(graph.nodes)}
    sites = []
    for att, grid in grids.items():
        if finest / grid[0] > cfg.max_downsample:
            continue
        site = _site(att, grid, users, index)
        if isinstance(site, str):
            stats.notes.append(f"%{att.output.name}: {site}, left alone")
            continue
        sites.append(site)
    for s in sites:
        sources = s.tokens - (-(-s.grid[0] // cfg.stride)) * (-(-s.grid[1] // cfg.stride))  # minus one per cell
        r = min(int(s.tokens * cfg.ratio), sources)
        if r <= 0:
            continue
        _insert(graph, s, r, cfg.stride)
        stats.merged.append((s.attention.output.name, s.tokens, r))
    if stats.merged:
        retype(graph, 0, "diffusion ToMe")
        from ..passes.cleanup import DeadCodeElimination

        DeadCodeElimination().run(graph, PassContext())
        verify(graph)
    return stats


def _insert(graph: Graph, s: Site, r: int, stride: int) -> None:
    merge = graph.add_node(
        "grid_merge", [s.x], {"r": r, "grid": list(s.grid), "stride": [stride, stride]}, name="tome", before=s.path[0]
    )
    merged, slot = merge.outputs
    for nd in s.path:
        nd.inputs = [merged if i is s.x else i for i in nd.inputs]
    readers = list(graph.users_of(s.out))
    before = min(readers, key=graph.nodes.index) if readers else None
    idx = graph.add_node("unsqueeze", [slot], {"axes": [-1]}, name="tome_slot", before=before).output
    idx = graph.add_node("expand", [idx], {"shape": [-1, -1, s.out.shape[2]]}, name="tome_slot", before=before).output
    unmerged = graph.add_node("gather_elements", [s.out, idx], {"axis": 1}, name="tome_unmerged", before=before).output
    for nd in readers:
        nd.inputs = [unmerged if i is s.out else i for i in nd.inputs]
    graph.outputs = [unmerged if o is s.out else o for o in graph.outputs]


@register_pass
class DiffusionToMePass(Pass):
    """ToMe-SD: token merging around a diffusion model's self-attentions (lossy)."""

    name = "diffusion_tome"
    lossy = True
    Options = DiffusionToMe

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.options.ratio == 0:
            return PassResult(False, {"ratio": 0})
        stats = merge_self_attention(graph, self.options)
        return PassResult(bool(stats.merged), {"merged": stats.merged, "notes": stats.notes})
