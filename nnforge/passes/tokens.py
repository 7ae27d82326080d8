"""Token merging (ToMe) and token pruning (EViT / PyramidDrop): lossy passes that shorten the sequence.

Both insert one op between the attention and the MLP of chosen blocks (see blocks.py), after which
every later op runs on fewer tokens. The passes keep a ``sizes`` tensor (how many original tokens
each one stands for) and rewire what depends on the token count:

* attention after a reduction gets ``log(sizes)`` as an additive mask (ToMe's proportional
  attention); padding has size 0, so the same bias also masks it;
* a padding mask read after a reduction (BERT's masked mean pooling) is recomputed from the
  sizes, so the mean stays a mean over the original tokens.

Configure by giving the settings to the pass: ``TokenMergePass(TokenMerge(r=8))`` (or
``TokenMerge(r=8).make_pass()``). r=0 / keep=1.0 leave the graph untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy

from ..errors import NnforgeError
from ..ir import Graph, Node, Value, symbols, verify
from ..ir.registry import OpError, infer_types
from .blocks import TOKEN_OPS, Block, BlockInfo, require_blocks
from .manager import Pass, PassContext, PassOptions, PassResult, register_pass

# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------

SCHEDULES = ("constant", "decreasing")


@dataclass
class TokenMerge(PassOptions):
    """ToMe: merge ``r`` tokens in every block (``decreasing``: 2r at the first block down to 0)."""

    r: int | list[int] = 8
    schedule: str = "constant"
    prop_attn: bool = True  # add log(size) to attention scores

    pass_name = "token_merge"

    def per_block(self, n: int) -> list[int]:
        if isinstance(self.r, (list, tuple)):
            if len(self.r) != n:
                raise NnforgeError(f"token_merge: r lists {len(self.r)} values for {n} blocks")
            return [int(x) for x in self.r]
        if self.schedule not in SCHEDULES:
            raise NnforgeError(f"token_merge: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "constant" or n == 1:
            return [int(self.r)] * n
        return [round(2 * self.r * (n - 1 - i) / (n - 1)) for i in range(n)]


SCORES = {"cls": "first", "mean": "mean", "last": "last"}  # TokenPrune.score -> attention_scores query


@dataclass
class TokenPrune(PassOptions):
    """Keep the fraction ``keep`` of the (unprotected) tokens at each of ``layers``, by the attention they receive.

    score: "cls" (from the class token, EViT), "mean" (averaged over queries) or "last" (the last
    token, PyramidDrop for decoder prefill); None picks cls / last / mean by model kind.
    """

    keep: float = 0.7
    layers: list[int] | None = None  # None: a quarter, half and three quarters of the way
    score: str | None = None
    fuse_dropped: bool = False
    prop_attn: bool = False

    pass_name = "token_prune"

    def chosen_layers(self, n: int) -> list[int]:
        layers = self.layers if self.layers is not None else sorted({n // 4, n // 2, (3 * n) // 4} - {n})
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise NnforgeError(f"token_prune: layers {bad} out of range for {n} blocks")
        return sorted(set(layers))


# ---------------------------------------------------------------------------------------
# graph surgery shared by both passes
# ---------------------------------------------------------------------------------------


def retype(graph: Graph, start: int = 0, who: str = "tokens") -> None:
    """Re-infer output types from node ``start`` on, after an input's shape changed."""
    for n in graph.nodes[start:]:
        try:
            types = infer_types(n.op, [i.type if i is not None else None for i in n.inputs], n.attrs)
        except (OpError, ValueError) as e:
            raise NnforgeError(
                f"{who}: %{n.outputs[0].name} ({n.op}) cannot take the shorter sequence: {e}"
                + (f" ({n.source})" if n.source else "")
            ) from None
        for o, t in zip(n.outputs, types):
            o.type = t


def first_user(graph: Graph, v: Value) -> Node:
    return next(n for n in graph.nodes if v in n.inputs)


def replace_uses_after(graph: Graph, old: Value, new: Value, after: Node) -> None:
    """Uses of ``old`` by nodes after ``after`` (and graph outputs) now read ``new``."""
    for n in graph.users_of(old):
        if graph.precedes(after, n):
            n.inputs = [new if i is old else i for i in n.inputs]
    graph.outputs = [new if o is old else o for o in graph.outputs]


@dataclass
class TokenState:
    """The current token sizes while walking the blocks; None until the first reduction."""

    info: BlockInfo
    prop_attn: bool
    sizes: Value | None = None
    ops: list[Node] = field(default_factory=list)  # every token op on the stream, earlier passes' included
    new_ops: list[Node] = field(default_factory=list)
    _bias: dict = field(default_factory=dict)

    def initial_sizes(self, graph: Graph, before: Node, dtype: str) -> Value | None:
        """Padding is size 0, real tokens 1; without a padding mask all are 1 (the ops' default)."""
        mask = self.info.padding_mask
        if self.sizes is not None or mask is None:
            return self.sizes
        zero = graph.add_constant(np.zeros((), mask.dtype), "zero")
        real = graph.add_node("ne", [mask, zero], name="real_token", before=before).output
        return graph.add_node("cast", [real], {"dtype": dtype}, name="token_sizes", before=before).output

    def attention_bias(self, graph: Graph, before: Node) -> Value | None:
        """[batch, 1, 1, seq] additive mask: log(size) (proportional attention) or 0 / -inf for padding only."""
        if self.sizes is None or (not self.prop_attn and self.info.padding_mask is None):
            return None
        if self.sizes not in self._bias:
            s = self.sizes
            if not self.prop_attn:
                s = graph.add_node("clamp", [s], {"max": 1.0}, name="is_token", before=before).output
            log = graph.add_node("log", [s], name="log_size", before=before).output
            self._bias[self.sizes] = graph.add_node(
                "unsqueeze", [log], {"axes": [1, 2]}, name="size_bias", before=before
            ).output
        return self._bias[self.sizes]

    def rewire_attention(self, graph: Graph, att: Node, who: str) -> None:
        """Attention after a reduction: its mask must match the new token count."""
        if self.sizes is None:
            return
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        if mask is not None and self.info.padding_mask is None and not _from_token_ops(mask):
            raise NnforgeError(
                f"{who}: attention %{att.output.name} has a mask that is not a padding mask of a graph "
                f"input; it cannot be re-derived for fewer tokens"
            )
        bias = self.attention_bias(graph, att)
        att.inputs = att.inputs[:3] + ([bias] if bias is not None else [])


def _from_token_ops(v: Value) -> bool:
    todo, seen = [v], set()
    while todo:
        x = todo.pop()
        if x in seen or x.producer is None:
            continue
        seen.add(x)
        if x.producer.op in TOKEN_OPS:
            return True
        todo.extend(i for i in x.producer.inputs if i is not None)
    return False


def rebase_padding(graph: Graph, state: TokenState) -> int:
    """Ops after a reduction that read the padding mask (masked mean pooling) read the latest token sizes instead.

    A value computed only from the padding mask or from an earlier reduction's sizes is recomputed
    from the sizes of the last reduction its reader comes after.
    """
    mask = state.info.padding_mask
    if mask is None or not state.new_ops:
        return 0
    index = {o: k for k, op in enumerate(state.ops) for o in op.outputs}
    sources = {mask} | {op.outputs[1] for op in state.ops}
    latest: dict[Value, int] = dict(index)  # value -> the last token op it comes after
    derived: dict[Value, bool] = {v: True for v in sources}  # computed from sources and constants only
    for n in graph.nodes:
        deps = [latest[i] for i in n.inputs if i is not None and i in latest]
        ins = [i for i in n.inputs if i is not None and not graph.is_constant(i)]
        for o in n.outputs:
            if o not in index:
                if deps:
                    latest[o] = max(deps)
                derived[o] = bool(ins) and all(derived.get(i, False) for i in ins)
    memo: dict = {}

    def clone(v: Value, k: int, before: Node) -> Value:
        sizes = state.ops[k].outputs[1]
        if v is sizes or not derived.get(v, False):
            return v
        if (v, k) not in memo:
            if v in sources:
                memo[(v, k)] = (
                    sizes
                    if v.dtype == sizes.dtype
                    else graph.add_node("cast", [sizes], {"dtype": v.dtype}, name="size_mask", before=before).output
                )
            else:
                n = v.producer
                ins = [clone(i, k, before) if i is not None else None for i in n.inputs]
                memo[(v, k)] = (
                    v
                    if all(a is b for a, b in zip(ins, n.inputs))
                    else graph.add_node(n.op, ins, dict(n.attrs), name=v.name, source=n.source, before=before).output
                )
        return memo[(v, k)]

    rebased = 0
    for n in list(graph.nodes):
        deps = [latest[i] for i in n.inputs if i is not None and i in latest]
        if n in state.ops or not deps:
            continue
        new = [clone(i, max(deps), n) if i is not None else None for i in n.inputs]
        if any(a is not b for a, b in zip(new, n.inputs)):
            n.inputs = new
            rebased += 1
    return rebased


def finish(graph: Graph, state: TokenState, who: str) -> dict:
    rebased = rebase_padding(graph, state)
    retype(graph, 0, who)
    from .cleanup import DeadCodeElimination

    DeadCodeElimination().run(graph, PassContext())
    verify(graph)
    return {"tokens": [str(op.outputs[0].shape[1]) for op in state.new_ops], "padding_rebased": rebased}


def reduce_tokens(graph: Graph, info: BlockInfo, who: str, prop_attn: bool, insert) -> dict | None:
    """Walk the blocks; ``insert(block, state, anchor) -> Node | None`` adds a token op at a block's mid.

    Keeps sizes flowing from op to op (earlier passes' included), rewires attention masks and the
    padding mask's readers, re-infers shapes and verifies. Returns stats, or None if nothing was inserted.
    """
    state = TokenState(info, prop_attn)
    for b in info.blocks:
        state.rewire_attention(graph, b.attention, who)
        for op in b.token_ops:  # an earlier pass's reduction: carry its sizes on
            state.sizes = op.outputs[1]
            state.ops.append(op)
        stream = _stream(b)
        anchor = first_user(graph, stream)
        node = insert(b, state, anchor)
        if node is None:
            continue
        replace_uses_after(graph, stream, node.outputs[0], node)
        # the next token op already on the stream (an earlier pass's, further down) now takes these sizes
        later = next((op for c in info.blocks if c.index > b.index for op in c.token_ops), None)
        if later is not None:
            later.inputs = later.inputs[:2] + [node.outputs[1]]
        state.sizes = node.outputs[1]
        state.ops.append(node)
        state.new_ops.append(node)
        retype(graph, graph.nodes.index(node), who)
    if not state.new_ops:
        return None
    return finish(graph, state, who)


def keys_metric(graph: Graph, att: Node, before: Node) -> Value:
    """ToMe's similarity features: the attention keys averaged over heads, [batch, seq, head_dim]."""
    k, h = att.inputs[1], att.attrs["num_heads"]
    split = graph.add_node(
        "reshape", [k], {"shape": [k.shape[0], -1, h, k.shape[2] // h]}, name="key_heads", before=before
    ).output
    return graph.add_node(
        "reduce_mean", [split], {"axes": [2], "keepdims": False}, name="key_metric", before=before
    ).output


def align(graph: Graph, v: Value, b: Block, before: Node) -> Value:
    """Per-token features of the block's attention (keys, scores), put through the token ops already at
    this block, so they line up with its (shorter) mid stream."""
    if not b.token_ops:
        return v
    flat = v.type.rank == 2
    if flat:
        v = graph.add_node("unsqueeze", [v], {"axes": [-1]}, name="as_tokens", before=before).output
    for op in b.token_ops:
        v = graph.add_node(op.op, [v] + op.inputs[1:], dict(op.attrs), name="aligned", before=before).outputs[0]
    if flat:
        v = graph.add_node("squeeze", [v], {"axes": [-1]}, name="aligned", before=before).output
    return v


def _stream(b: Block) -> Value:
    """The block's mid stream after the token ops already there (an earlier pass's): a new op reduces that."""
    return b.token_ops[-1].outputs[0] if b.token_ops else b.mid


def _tokens_at(b: Block):
    return _stream(b).shape[1]


# ---------------------------------------------------------------------------------------
# the passes
# ---------------------------------------------------------------------------------------


@register_pass
class TokenMergePass(Pass):
    """ToMe bipartite soft matching between attention and MLP of every block (lossy)."""

    name = "token_merge"
    lossy = True
    Options = TokenMerge
    requires = ("blocks",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        info = require_blocks(graph, self.name)
        rs = cfg.per_block(len(info.blocks))
        if not any(rs):
            return PassResult(False, {"r": rs})
        if info.kind == "decoder":
            raise NnforgeError(
                "token_merge: merging tokens of a causal decoder would mix past and future; "
                "use token_prune for decoder prefill"
            )
        rs_by_block = {b.index: r for b, r in zip(info.blocks, rs)}

        def insert(b: Block, state: TokenState, anchor: Node):
            r, tokens = rs_by_block[b.index], _tokens_at(b)
            if isinstance(tokens, int):  # as ToMe: never more than the mergeable sources
                r = min(r, (tokens + 1) // 2 - (info.class_tokens + 1) // 2)
            if r <= 0:
                return None
            metric = align(graph, keys_metric(graph, b.attention, anchor), b, anchor)
            sizes = state.initial_sizes(graph, anchor, b.mid.dtype)
            args = [_stream(b), metric] + ([sizes] if sizes is not None else [])
            return graph.add_node(
                "token_merge", args, {"r": r, "protect_first": info.class_tokens}, name="merged", before=anchor
            )

        stats = reduce_tokens(graph, info, self.name, cfg.prop_attn, insert)
        return PassResult(stats is not None, {"r": rs, **(stats or {})})


def keep_count(tokens, keep: float, protected: int):
    """Tokens kept of ``tokens`` when keeping the fraction ``keep`` of the unprotected ones (an expression if symbolic)."""
    frac = Fraction(keep).limit_denominator(1000)
    if isinstance(tokens, int):
        return protected + math.ceil(frac * (tokens - protected))
    free = symbols.to_sympy(tokens) - protected  # ceil(a/b) as floor((a + b - 1)/b): backends floor positive divisions
    return symbols.from_sympy(
        protected + sympy.floor((frac.numerator * free + frac.denominator - 1) / frac.denominator)
    )


@register_pass
class TokenPrunePass(Pass):
    """Keep the most attended tokens at chosen blocks; decoders always keep the last token (lossy)."""

    name = "token_prune"
    lossy = True
    Options = TokenPrune
    requires = ("blocks",)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cfg = self.options
        if not 0.0 < cfg.keep <= 1.0:
            raise NnforgeError(f"token_prune: keep must be in (0, 1], got {cfg.keep}")
        if cfg.keep == 1.0:
            return PassResult(False, {"keep": 1.0})
        info = require_blocks(graph, self.name)
        layers = cfg.chosen_layers(len(info.blocks))
        decoder = info.kind == "decoder"
        score = cfg.score or ("cls" if info.class_tokens else "last" if decoder else "mean")
        if score not in SCORES:
            raise NnforgeError(f"token_prune: score must be one of {sorted(SCORES)}, got {score!r}")
        if score == "cls" and not info.class_tokens:
            raise NnforgeError("token_prune: score='cls' needs a class token; this model has none (use 'mean')")
        first, last = info.class_tokens, 1 if decoder else 0

        def insert(b: Block, state: TokenState, anchor: Node):
            if b.index not in layers:
                return None
            tokens = _tokens_at(b)
            keep = keep_count(tokens, cfg.keep, first + last)
            if isinstance(tokens, int) and keep >= tokens:
                return None
            att = b.attention
            scores = graph.add_node(
                "attention_scores",
                att.inputs[:2] + att.inputs[3:4],
                {
                    "num_heads": att.attrs["num_heads"],
                    "scale": att.attrs["scale"],
                    "is_causal": att.attrs["is_causal"],
                    "query": SCORES[score],
                },
                name="received",
                before=anchor,
            ).output
            scores = align(graph, scores, b, anchor)
            sizes = state.initial_sizes(graph, anchor, b.mid.dtype)
            args = [_stream(b), scores] + ([sizes] if sizes is not None else [])
            return graph.add_node(
                "token_prune",
                args,
                {"keep": keep, "protect_first": first, "protect_last": last, "fuse_dropped": cfg.fuse_dropped},
                name="pruned",
                before=anchor,
            )

        stats = reduce_tokens(graph, info, self.name, cfg.prop_attn, insert)
        if stats is None:
            return PassResult(False, {"keep": cfg.keep})
        return PassResult(True, {"keep": cfg.keep, "layers": layers, "score": score, **stats})
