"""Finding transformer blocks in the IR.

After the lossless fusion pipeline every family nnforge knows reads as a chain of blocks on a
residual stream ``[batch, seq, hidden]``:

    pre-norm (ViT, GPT):   h = x + proj(attention(norm(x)));  y = h + mlp(norm(h))
    post-norm (BERT):      h = norm(x + proj(attention(x)));  y = norm(h + mlp(h))

``find_blocks(graph)`` returns that structure as plain dataclasses: per block the stream value in,
the residual add after attention, the stream between attention and MLP (where tokens are merged
or pruned), the residual add after the MLP and the stream out; for the model, the token axis, a
class token, a padding mask input and how the output reads the tokens. ``format_blocks`` is the
text ``nnforge show --blocks`` prints.

nn.MultiheadAttention (BERT-style encoders built from nn.TransformerEncoderLayer) is traced
sequence-first, with its heads folded into the batch; the ``fuse_torch_mha`` rules below turn
that into the same ``attention`` op on ``[batch, seq, heads*dim]`` the other families fuse to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NnforgeError
from ..ir import Graph, Node, Value, symbols
from .manager import PassContext, PassManager, register_pass
from .pattern import Bind, P, RewritePass, Rule

# ---------------------------------------------------------------------------------------
# nn.MultiheadAttention -> attention
# ---------------------------------------------------------------------------------------

# q/k/v of the packed in-projection, sequence-first:
#   reshape(linear(permute(x, [1,0,2])), [S, B, 3, E]).unsqueeze(0).permute(3,1,2,0,4).squeeze(3)[i]
_PACKED = P(
    "squeeze",
    P(
        "permute",
        P(
            "unsqueeze",
            P("reshape", P("linear", P("permute", "x", perm=[1, 0, 2]), "w", "b"), shape=Bind("packed")),
            axes=[0],
        ),
        perm=[3, 1, 2, 0, 4],
    ),
    axes=[3],
    bind="packed_v",
)
UNPACK_MHA = Rule(
    "unpack_mha_qkv",
    P("squeeze", P("slice", _PACKED, axis=0, start=Bind("i"), end=Bind("j"), step=1), axes=[0]),
    lambda m, b: b.op(
        "permute",
        b.op(
            "slice",
            b.op("linear", m["x"], m["w"], m["b"]),
            axis=-1,
            start=m["i"] * m["packed"][3],
            end=m["j"] * m["packed"][3],
        ),
        perm=[1, 0, 2],
    ),
    lambda m, g: (
        len(m["packed"]) == 4 and m["packed"][2] == 3 and m["j"] == m["i"] + 1 and isinstance(m["packed"][3], int)
    ),
    allow_shared=("packed_v",),
)


def _mha_head(name):
    """[B, S, E] -> [B, H, S, D] as MultiheadAttention writes it: through [S, B*H, D]."""
    sbe = P("permute", name, perm=[1, 0, 2])
    return P(
        "reshape", P("permute", P("reshape", sbe, shape=Bind(f"{name}_bh")), perm=[1, 0, 2]), shape=Bind(f"{name}_4d")
    )


_MHA_SDPA = P("sdpa", _mha_head("q"), _mha_head("k"), _mha_head("v"), ..., bind="sdpa")
_MHA_OUT = P(
    "permute",
    P(
        "reshape",
        P("linear", P("reshape", P("permute", _MHA_SDPA, perm=[2, 0, 1, 3]), shape=Bind("flat")), "wo", "bo"),
        shape=Bind("sbe"),
    ),
    perm=[1, 0, 2],
)


def _mha_check(m, g):
    shapes = [m[f"{n}_4d"] for n in "qkv"]
    if any(len(s) != 4 or not isinstance(s[1], int) or not isinstance(s[3], int) for s in shapes):
        return False
    heads, dim = shapes[0][1], shapes[0][3]
    q = m["q"]
    return (
        q.type.rank == 3
        and q.shape[-1] == heads * dim
        and all(s[1] == heads for s in shapes)
        and g.is_constant(m["wo"])
        and len(m.node("sdpa").inputs) <= 4
    )


def _mha_build(m, b):
    sdpa = m.node("sdpa")
    mask = [x for x in sdpa.inputs[3:4] if x is not None]
    att = b.op(
        "attention",
        m["q"],
        m["k"],
        m["v"],
        *mask,
        num_heads=m["q_4d"][1],
        scale=sdpa.attrs["scale"],
        is_causal=sdpa.attrs["is_causal"],
    )
    return b.op("linear", att, m["wo"], m["bo"])


FUSE_MHA = Rule("fuse_torch_mha", _MHA_OUT, _mha_build, _mha_check)


@register_pass
class FuseTorchMHA(RewritePass):
    """nn.MultiheadAttention's sequence-first trace -> one attention op on [batch, seq, heads*dim] (lossless)."""

    name = "fuse_torch_mha"
    rules = [UNPACK_MHA, FUSE_MHA]


# the lossless pipeline blocks are found after (tests/test_fusion.py's, plus the MHA rules)
BLOCK_PIPELINE = [
    "dce",
    "canonicalize",
    "fold_constants",
    "fold_constant_chains",
    "recognize_norms",
    "fuse_linear_act",
    "fuse_attention",
    "fuse_torch_mha",
    "cse",
    "canonicalize",
    "dce",
]


def prepare(graph: Graph, ctx: PassContext | None = None) -> Graph:
    """Run the lossless pipeline blocks are found after (a no-op on an already fused graph)."""
    return PassManager(BLOCK_PIPELINE).run(graph, ctx or PassContext())


# ---------------------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------------------

NORMS = ("layer_norm", "rms_norm")
ATTENTION_OPS = ("attention",)
TOKEN_OPS = ("token_merge", "token_prune")  # ops that shorten the stream (ops/tokens.py)
# ops that act on each token alone: a block's residual branches may only be made of these and attention
TOKENWISE = {
    "linear",
    "linear_act",
    "layer_norm",
    "rms_norm",
    "add",
    "mul",
    "sub",
    "div",
    "gelu",
    "relu",
    "silu",
    "tanh",
    "sigmoid",
    "slice",
    "clamp",
    "cast",
    "exp",
    "neg",
}


@dataclass
class Block:
    index: int
    input: Value  # residual stream into the block
    attention: Node  # the attention op
    attn_add: Node  # residual add after attention
    mid: Value  # stream between attention and MLP (after the post-norm, if any)
    mlp_add: Node  # residual add after the MLP
    output: Value  # stream out (after the post-norm, if any)
    norm: str  # "pre" or "post"
    causal: bool
    token_ops: list[Node] = field(default_factory=list)  # token_merge/prune already between attention and MLP

    @property
    def heads(self) -> int:
        return self.attention.attrs["num_heads"]


@dataclass
class BlockInfo:
    blocks: list[Block]
    token_axis: int = 1
    tokens: symbols.Dim = 0  # sequence length at the first block
    hidden: int = 0
    class_tokens: int = 0  # leading tokens prepended from constants (ViT's [CLS])
    padding_mask: Value | None = None  # graph input [batch, seq] the attention masks come from
    readout: str = "tokens"  # "first" (class token), "mean" (masked mean), "tokens" (all, e.g. LM logits)
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "decoder" if self.blocks and all(b.causal for b in self.blocks) else "encoder"


def _users(graph: Graph) -> dict[Value, list[Node]]:
    return graph.users()


def _ancestors(v: Value, stop_ops=()) -> set[Value]:
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.producer is not None and x.producer.op not in stop_ops:
            todo.extend(i for i in x.producer.inputs if i is not None)
    return seen


def _branch_add(att: Node, users) -> Node | None:
    """Follow the attention output through single-user token-wise ops to the residual add."""
    v = att.output
    for _ in range(8):
        us = users.get(v, [])
        if len(us) != 1:
            return None
        n = us[0]
        if n.op == "add":
            return n
        if n.op not in TOKENWISE:
            return None
        v = n.output
    return None


def _other(add: Node, v: Value) -> Value:
    a, b = add.inputs
    return b if a is v else a


def _after_norm(v: Value, users) -> tuple[Value, str]:
    """A post-norm block normalises the sum and carries only the normalised stream on."""
    us = users.get(v, [])
    if len(us) == 1 and us[0].op in NORMS:
        return us[0].output, "post"
    return v, "pre"


def _between(v: Value, stop: Value) -> tuple[list[Node], bool]:
    """Nodes computing ``v`` back to ``stop`` (not through it), and whether ``stop`` is reached."""
    nodes, seen, todo, reached = [], set(), [v], False
    while todo:
        x = todo.pop()
        if x is stop:
            reached = True
            continue
        if x in seen or x.producer is None:
            continue
        seen.add(x)
        nodes.append(x.producer)
        todo.extend(i for i in x.producer.inputs if i is not None)
    return nodes, reached


def _mlp_add(mid: Value, users) -> Node | None:
    """The add of ``mid`` and a branch computed from ``mid`` through linear layers and no attention."""
    for n in users.get(mid, []):
        if n.op != "add" or n.inputs.count(mid) != 1:
            continue
        branch, reached = _between(_other(n, mid), mid)
        ops = {b.op for b in branch}
        if reached and not ops & set(ATTENTION_OPS) and ops & {"linear", "linear_act"} and len(branch) <= 64:
            return n
    return None


def _block_at(k: int, att: Node, users) -> Block | str:
    add = _branch_add(att, users)
    if add is None:
        return f"attention %{att.output.name}: no residual add after it"
    streams = [x for x in add.inputs if att.output not in _ancestors(x)]
    if len(streams) != 1 or streams[0] not in _ancestors(att.inputs[0]):
        return f"attention %{att.output.name}: the add %{add.output.name} is not a residual around it"
    mid, norm = _after_norm(add.output, users)
    mid, token_ops = _through_token_ops(mid, users)
    mlp = _mlp_add(mid, users)
    if mlp is None:
        return f"attention %{att.output.name}: no residual MLP after it"
    out = _after_norm(mlp.output, users)[0] if norm == "post" else mlp.output
    return Block(k, streams[0], att, add, mid, mlp, out, norm, att.attrs.get("is_causal", False), token_ops)


def _mask_inputs(att: Node, graph: Graph) -> set[Value]:
    """Graph inputs an attention mask comes from (token sizes of earlier reductions stand in for their inputs)."""
    if len(att.inputs) < 4 or att.inputs[3] is None:
        return set()
    return {x for x in _ancestors(att.inputs[3], TOKEN_OPS) if x in graph.inputs}


def _through_token_ops(v: Value, users) -> tuple[Value, list[Node]]:
    """Token ops an earlier pass put on the stream: the block's mid is after them."""
    ops = []
    while len(users.get(v, [])) >= 1 and any(u.op in TOKEN_OPS and u.inputs[0] is v for u in users[v]):
        op = next(u for u in users[v] if u.op in TOKEN_OPS and u.inputs[0] is v)
        ops.append(op)
        v = op.outputs[0]
    return v, ops


def _readout(graph: Graph, last: Value, padding: Value | None, users) -> str:
    """How the outputs read the final stream: the class token, a masked mean, or every token."""
    us = users.get(last, [])
    while len(us) == 1 and us[0].op in NORMS:  # the final norm is token-wise
        us = users.get(us[0].output, [])
    for n in us:
        if n.op == "slice" and n.attrs["axis"] in (1, -2) and n.attrs["start"] == 0 and n.attrs["end"] == 1:
            return "first"
    if padding is not None and any(padding in _ancestors(o) and last in _ancestors(o) for o in graph.outputs):
        return "mean"
    return "tokens"


def find_blocks(graph: Graph) -> BlockInfo:
    """The transformer blocks of a fused graph, in order; an empty list if there are none."""
    users = _users(graph)
    atts = [n for n in graph.nodes if n.op in ATTENTION_OPS]
    info = BlockInfo([])
    for k, att in enumerate(atts):
        got = _block_at(k, att, users)
        if isinstance(got, str):
            info.notes.append(got)
            continue
        if info.blocks and info.blocks[-1].output is not got.input:
            info.notes.append(f"block {k} does not read block {k - 1}'s output: the chain stops there")
            break
        info.blocks.append(got)
    for n in graph.nodes:
        if n.op == "sdpa":
            info.notes.append(f"sdpa %{n.output.name} was not fused into attention: not a block")
    if not info.blocks:
        return info
    for k, b in enumerate(info.blocks):
        b.index = k
    first = info.blocks[0]
    info.tokens = first.input.shape[1]
    info.hidden = first.input.shape[2]
    info.class_tokens = _class_tokens_of(graph, first.input)
    masks = set().union(*(_mask_inputs(b.attention, graph) for b in info.blocks))
    if len(masks) == 1:
        (mask,) = masks
        if mask.type.rank == 2:
            info.padding_mask = mask
    elif len(masks) > 1:
        info.notes.append(f"attention masks come from several inputs {sorted(m.name for m in masks)}")
    info.readout = _readout(graph, info.blocks[-1].output, info.padding_mask, users)
    return info


def _class_tokens_of(graph: Graph, first: Value) -> int:
    """Leading constant tokens: the stream starts as concat([expand(constant), patches], axis=1) (+ position)."""
    v = first
    for _ in range(6):
        n = v.producer
        if n is None:
            return 0
        if n.op == "concat" and n.attrs["axis"] in (1, -2):
            lead = n.inputs[0]
            src = lead.producer.inputs[0] if lead.producer is not None and lead.producer.op == "expand" else lead
            if graph.is_constant(src) and isinstance(lead.shape[1], int):
                return lead.shape[1]
            return 0
        if n.op in ("add", "mul", "layer_norm", "rms_norm"):
            streams = [i for i in n.inputs if i is not None and not graph.is_constant(i) and i.type.rank == 3]
            if len(streams) != 1:
                return 0
            v = streams[0]
            continue
        return 0
    return 0


def require_blocks(graph: Graph, who: str) -> BlockInfo:
    """find_blocks, fusing first if the graph has not been through the lossless pipeline; a clear error if none."""
    info = find_blocks(graph)
    if not info.blocks:
        fused = prepare(graph)
        if fused is not graph:  # the manager edits in place; keep the caller's object
            graph.__dict__.update(fused.__dict__)
        info = find_blocks(graph)
    if not info.blocks:
        why = "; ".join(info.notes) or "no attention op in the graph"
        raise NnforgeError(f"{who}: found no transformer blocks ({why})")
    return info


def format_blocks(info: BlockInfo) -> str:
    """What `nnforge show --blocks` prints."""
    if not info.blocks:
        return "no transformer blocks found" + "".join(f"\n  note: {n}" for n in info.notes)
    lines = [
        f"{len(info.blocks)} {info.kind} block(s), {info.blocks[0].norm}-norm; tokens on axis {info.token_axis}: "
        f"{info.tokens} x {info.hidden}",
        f"class tokens: {info.class_tokens}; padding mask: "
        f"{('%' + info.padding_mask.name) if info.padding_mask is not None else 'none'}; readout: {info.readout}",
    ]
    for b in info.blocks:
        lines.append(
            f"  block {b.index}: %{b.input.name} -> attention %{b.attention.output.name} "
            f"(heads={b.heads}{', causal' if b.causal else ''}) -> +%{b.attn_add.output.name} -> "
            f"mid %{b.mid.name} -> mlp +%{b.mlp_add.output.name} -> %{b.output.name}"
        )
    lines += [f"  note: {n}" for n in info.notes]
    return "\n".join(lines)
