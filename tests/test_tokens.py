"""Token ops, block finding, token merging (ToMe) and token pruning (EViT / PyramidDrop)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from digits_vit import accuracy

from nnforge.errors import NnforgeError
from nnforge.ir import Graph, OpError, TensorType, interpret, verify
from nnforge.models import zoo
from nnforge.passes.blocks import find_blocks, format_blocks, prepare
from nnforge.passes.manager import PassContext, PassManager
from nnforge.passes.tokens import TokenMerge, TokenMergePass, TokenPrune, TokenPrunePass, keep_count

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _fused(family: str):
    from nnforge.frontend.torch import import_torch

    zm = zoo.build(family, "tiny")
    return prepare(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes)), [x.numpy() for x in zm.inputs]


def fused(family: str):
    g, inputs = _fused(family)
    return g.copy(), [a.copy() for a in inputs]


def run_pass(p, g, inputs=None):
    res = p.run(g, PassContext(sample_inputs=inputs))
    g = res.graph or g
    verify(g)
    return g, res


# ---- the ops ------------------------------------------------------------------------


def tome_reference(x, metric, size, r):
    """ToMe's bipartite_soft_matching + merge_wavg (class_token=True), as in facebookresearch/ToMe."""
    x, metric, size = (torch.from_numpy(a) for a in (x, metric, size[..., None]))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    xs = merge(x * size)
    s = merge(size)
    return (xs / s).numpy(), s[..., 0].numpy()


@pytest.mark.parametrize("seq,r", [(17, 4), (16, 7), (9, 1)])
def test_token_merge_matches_tome(seq, r):
    x, metric = randn(3, seq, 8), randn(3, seq, 5)
    size = rng.integers(1, 4, (3, seq)).astype(np.float32)
    g = Graph()
    vx, vm, vs = (g.add_input(n, TensorType.of(a)) for n, a in (("x", x), ("m", metric), ("s", size)))
    node = g.add_node("token_merge", [vx, vm, vs], {"r": r, "protect_first": 1})
    g.outputs = node.outputs
    assert node.outputs[0].shape == (3, seq - r, 8) and node.outputs[1].shape == (3, seq - r)
    got_x, got_s = interpret(g, [x, metric, size])
    want_x, want_s = tome_reference(x, metric, size, r)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_s, want_s)
    assert got_s.sum() == size.sum()  # sizes are conserved
    np.testing.assert_array_equal(got_x[:, 0], x[:, 0])  # the class token is never merged


def test_token_merge_shapes_and_errors():
    g = Graph()
    x = g.add_input("x", TensorType(("batch", "seq", 8)))
    out, sizes = g.add_node("token_merge", [x, x], {"r": 3}).outputs
    assert out.shape == ("batch", "seq - 3", 8) and sizes.shape == ("batch", "seq - 3")
    g2 = Graph()
    x2 = g2.add_input("x", TensorType((1, 6, 8)))
    with pytest.raises(OpError, match="token_merge: cannot merge r=3"):
        g2.add_node("token_merge", [x2, x2], {"r": 3, "protect_first": 1})
    with pytest.raises(OpError, match="metric must be"):
        g2.add_node("token_merge", [x2, g2.add_input("m", TensorType((1, 5, 8)))], {"r": 1})


def test_padding_tokens_merge_first_and_weigh_nothing():
    x, metric = randn(1, 8, 4), randn(1, 8, 4)
    sizes = np.array([[1, 1, 1, 1, 0, 1, 0, 0]], np.float32)  # tokens 4, 6, 7 are padding
    g = Graph()
    ins = [g.add_input(n, TensorType.of(a)) for n, a in (("x", x), ("m", metric), ("s", sizes))]
    g.outputs = g.add_node("token_merge", ins, {"r": 2}).outputs
    out, s = interpret(g, [x, metric, sizes])
    assert s.sum() == sizes.sum() and (s == 0).sum() == 1  # two even padding tokens merged away
    real = [0, 2]  # the kept sources, unchanged
    np.testing.assert_array_equal(out[0, :2], x[0, real])


def test_token_prune_keeps_top_scores_in_order_and_protects_ends():
    x = randn(2, 6, 3)
    scores = np.array([[0.0, 0.9, 0.1, 0.8, 0.2, 0.0], [0.5, 0.1, 0.2, 0.3, 0.4, 0.0]], np.float32)
    g = Graph()
    vx, vsc = g.add_input("x", TensorType.of(x)), g.add_input("s", TensorType.of(scores))
    g.outputs = g.add_node("token_prune", [vx, vsc], {"keep": 4, "protect_first": 1, "protect_last": 1}).outputs
    out, sizes = interpret(g, [x, scores])
    np.testing.assert_array_equal(out[0], x[0, [0, 1, 3, 5]])
    np.testing.assert_array_equal(out[1], x[1, [0, 3, 4, 5]])
    assert sizes.shape == (2, 4) and (sizes == 1).all()

    g = Graph()
    vx, vsc = g.add_input("x", TensorType.of(x)), g.add_input("s", TensorType.of(scores))
    g.outputs = g.add_node("token_prune", [vx, vsc], {"keep": 3, "fuse_dropped": True}).outputs
    out, sizes = interpret(g, [x, scores])
    assert out.shape == (2, 4, 3) and sizes[:, -1].tolist() == [3.0, 3.0]
    w = scores[0, [0, 2, 5]]
    np.testing.assert_allclose(out[0, -1], (x[0, [0, 2, 5]] * w[:, None]).sum(0) / w.sum(), rtol=1e-6)


def test_attention_scores_are_the_attention_received():
    q, k = randn(2, 5, 8), randn(2, 5, 8)
    g = Graph()
    vq, vk = g.add_input("q", TensorType.of(q)), g.add_input("k", TensorType.of(k))
    g.outputs = [g.op("attention_scores", vq, vk, num_heads=2, query=query) for query in ("first", "last", "mean")]
    first, last, mean = interpret(g, [q, k])
    qh, kh = q.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3), k.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)
    p = torch.softmax(torch.from_numpy(qh @ kh.transpose(0, 1, 3, 2) / 2.0), -1).numpy().mean(1)
    np.testing.assert_allclose(first, p[:, 0], rtol=1e-5)
    np.testing.assert_allclose(last, p[:, -1], rtol=1e-5)
    np.testing.assert_allclose(mean, p.mean(1), rtol=1e-5)
    np.testing.assert_allclose(mean.sum(-1), 1.0, rtol=1e-5)


def test_keep_count():
    assert keep_count(197, 0.7, 1) == 1 + math.ceil(0.7 * 196)
    assert keep_count(10, 1.0, 0) == 10
    assert keep_count("seq", 0.5, 0) == "floor(seq/2 + 1/2)"  # ceil(seq/2), with a positive numerator


# ---- finding blocks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "family,norm,cls,mask,readout,kind",
    [
        ("vit", "pre", 1, False, "first", "encoder"),
        ("bert", "post", 0, True, "mean", "encoder"),
        ("gpt", "pre", 0, False, "tokens", "decoder"),
    ],
)
def test_blocks_are_found_in_each_family(family, norm, cls, mask, readout, kind):
    g, _ = fused(family)
    info = find_blocks(g)
    assert len(info.blocks) == 2 and all(b.norm == norm for b in info.blocks)
    assert info.class_tokens == cls and (info.padding_mask is not None) == mask and info.readout == readout
    assert info.kind == kind and info.token_axis == 1 and info.hidden == 32
    assert info.blocks[1].input is info.blocks[0].output
    text = format_blocks(info)
    assert f"2 {kind} block(s), {norm}-norm" in text and "block 1:" in text


def test_no_blocks_in_an_mlp_and_a_clear_error():
    g, x = fused("mlp")
    assert find_blocks(g).blocks == [] and "no transformer blocks" in format_blocks(find_blocks(g))
    with pytest.raises(NnforgeError, match="token_merge: found no transformer blocks"):
        TokenMergePass(TokenMerge(r=2)).run(g, PassContext())


# ---- token merging ------------------------------------------------------------------


def test_tome_on_vit_shrinks_tokens_as_planned():
    g, x = fused("vit")
    ref = interpret(g, x)[0]
    g, res = run_pass(TokenMergePass(TokenMerge(r=3)), g)
    assert res.stats["tokens"] == ["14", "11"] and res.changed
    merges = [n for n in g.nodes if n.op == "token_merge"]
    assert [n.outputs[0].shape[1] for n in merges] == [14, 11]
    att = [n for n in g.nodes if n.op == "attention"]
    assert len(att[0].inputs) == 3 and att[1].inputs[3].shape == ("batch", 1, 1, 14)  # log-size bias after merging
    out = interpret(g, x)[0]
    assert out.shape == ref.shape and np.isfinite(out).all()


def test_decreasing_schedule_and_r_zero_is_exact():
    assert TokenMerge(r=4, schedule="decreasing").per_block(3) == [8, 4, 0]
    g, x = fused("vit")
    ref = interpret(g, x)[0]
    before = str(g)
    _, res = run_pass(TokenMergePass(TokenMerge(r=0)), g)
    assert not res.changed and str(g) == before
    np.testing.assert_array_equal(interpret(g, x)[0], ref)


def test_tome_options_through_the_pass_manager():
    g, x = fused("vit")
    pm = PassManager([TokenMerge(r=2)], check=True)  # settings in a pipeline build their pass
    out = pm.run(g, PassContext(sample_inputs=x))
    assert out.op_counts()["token_merge"] == 2 and pm.records[0].lossy and pm.records[0].max_error < 0.5


def test_tome_on_bert_with_padding_is_exact_while_only_padding_merges():
    g, (ids, _) = fused("bert")
    mask = np.ones_like(ids)
    mask[:, 12:] = 0  # every sequence padded: positions 12 and 14 are even (mergeable) padding
    ref = interpret(g, [ids, mask])[0]
    merged, res = run_pass(TokenMergePass(TokenMerge(r=[2, 0])), g.copy())
    assert res.stats["tokens"] == ["seq - 2"] and res.stats["padding_rebased"] >= 1
    np.testing.assert_allclose(interpret(merged, [ids, mask])[0], ref, rtol=1e-4, atol=1e-5)
    # merging real tokens too: close, not equal, and still a masked mean over the original tokens
    merged, _ = run_pass(TokenMergePass(TokenMerge(r=3)), g.copy())
    out = interpret(merged, [ids, mask])[0]
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert out.shape == ref.shape and (cos > 0.9).all()


def test_token_merge_refuses_decoders():
    g, _ = fused("gpt")
    with pytest.raises(NnforgeError, match="causal decoder"):
        TokenMergePass(TokenMerge(r=2)).run(g, PassContext())


# ---- token pruning ------------------------------------------------------------------


def test_prune_vit_by_class_attention():
    g, x = fused("vit")
    ref = interpret(g, x)[0]
    pruned, res = run_pass(TokenPrunePass(TokenPrune(keep=0.5, layers=[0, 1])), g.copy())
    assert res.stats["score"] == "cls" and res.stats["tokens"] == ["9", "5"]
    assert interpret(pruned, x)[0].shape == ref.shape
    # pruning before the last MLP only: the class token's path is untouched, so the output is too
    last, _ = run_pass(TokenPrunePass(TokenPrune(keep=0.5, layers=[1])), g.copy())
    np.testing.assert_allclose(interpret(last, x)[0], ref, rtol=1e-5, atol=1e-6)
    fused_, res = run_pass(TokenPrunePass(TokenPrune(keep=0.5, layers=[0], fuse_dropped=True)), g.copy())
    assert res.stats["tokens"] == ["10"]


def test_keep_one_is_exact():
    g, x = fused("bert")
    ref = interpret(g, x)[0]
    _, res = run_pass(TokenPrunePass(TokenPrune(keep=1.0)), g)
    assert not res.changed
    np.testing.assert_array_equal(interpret(g, x)[0], ref)


def test_prune_gpt_prefill_keeps_the_last_token():
    g, (ids,) = fused("gpt")
    ref = interpret(g, [ids])[0]
    pruned, res = run_pass(TokenPrunePass(TokenPrune(keep=0.5, layers=[1])), g.copy())
    assert res.stats["score"] == "last"
    out = interpret(pruned, [ids])[0]
    assert out.shape == (2, 9, 100)  # 15 prompt tokens -> 8 kept + the last
    np.testing.assert_allclose(out[:, -1], ref[:, -1], rtol=1e-4, atol=1e-5)  # the last token's MLP is token-wise
    deep, _ = run_pass(TokenPrunePass(TokenPrune(keep=0.5, layers=[0])), g.copy())
    out = interpret(deep, [ids])[0]
    assert out.shape == (2, 9, 100) and np.argmax(out[:, -1], -1).shape == (2,)


def test_prune_then_merge_compose():
    g, x = fused("bert")
    g, _ = run_pass(TokenPrunePass(TokenPrune(keep=0.75, layers=[0])), g)
    g, res = run_pass(TokenMergePass(TokenMerge(r=2)), g)
    # the second prune lines block 0's keys up with the pruned stream, for the merge's matching
    assert g.op_counts()["token_prune"] == 2 and g.op_counts()["token_merge"] == 2
    out = interpret(g, x)[0]
    assert out.shape == (2, 32) and np.isfinite(out).all()


@pytest.mark.parametrize("merge_first", [True, False])
def test_merge_and_prune_compose_on_a_vit_in_either_order(merge_first):
    """The second pass reduces the stream the first one left (its op goes after the first's in a block,
    and the first's next op downstream takes the new sizes): shapes chain, both backends agree."""
    from nnforge.backends.base import get_backend
    from nnforge.targets import get_target

    g, x = fused("vit")
    passes = [TokenMergePass(TokenMerge(r=2)), TokenPrunePass(TokenPrune(keep=0.7, layers=[0]))]
    for p in passes if merge_first else passes[::-1]:
        g, _ = run_pass(p, g)
    att = [n for n in g.nodes if n.op == "attention"]
    merged_only, _ = run_pass(TokenMergePass(TokenMerge(r=2)), fused("vit")[0])
    att_merged = [n for n in merged_only.nodes if n.op == "attention"]
    # block 1's attention sees the merged stream pruned once more (kept 70% of block 0's output)
    assert att[1].inputs[0].shape[1] < att_merged[1].inputs[0].shape[1]
    verify(g)
    out = interpret(g, x)[0]
    for backend in ("onnxrt", "tvm"):
        got = get_backend(backend).build(g, get_target("cpu"), {}).run(x)[0]
        np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4, err_msg=backend)


def test_prune_options_are_checked():
    g, _ = fused("bert")
    with pytest.raises(NnforgeError, match="needs a class token"):
        TokenPrunePass(TokenPrune(keep=0.5, score="cls")).run(g, PassContext())
    with pytest.raises(NnforgeError, match="keep must be in"):
        TokenPrunePass(TokenPrune(keep=0.0)).run(g, PassContext())
    with pytest.raises(NnforgeError, match="out of range"):
        TokenPrunePass(TokenPrune(keep=0.5, layers=[7])).run(g, PassContext())


# ---- quality on real data -----------------------------------------------------------


def test_quality_on_the_digits_vit(digits_vit):
    d = digits_vit
    batches = d.batches(d.x_test)

    def acc(graph):
        return accuracy(np.concatenate([interpret(graph, b)[0] for b in batches]), d.y_test)

    base = acc(d.graph)
    assert base > 0.96  # 97.4% of the 497 unseen digits
    drops = {}
    for name, p in [
        ("r=1", TokenMergePass(TokenMerge(r=1))),
        ("r=3", TokenMergePass(TokenMerge(r=3))),
        ("r=8", TokenMergePass(TokenMerge(r=8))),
        ("keep=0.7", TokenPrunePass(TokenPrune(keep=0.7))),
        ("keep=0.5", TokenPrunePass(TokenPrune(keep=0.5))),
    ]:
        g, _ = run_pass(p, d.graph.copy())
        drops[name] = base - acc(g)
    # measured: r=1 and r=3 0, r=8 (65 -> 17 tokens) 0.2, keep=0.7 1.0 and keep=0.5 0.6 points
    assert drops["r=1"] <= 0.005 and drops["r=3"] <= 0.01 and drops["r=8"] <= 0.02, drops
    assert max(drops.values()) <= 0.03, drops


# ---- backends -----------------------------------------------------------------------

BACKEND_CASES = [
    ("vit", lambda: TokenMergePass(TokenMerge(r=3))),
    ("vit", lambda: TokenPrunePass(TokenPrune(keep=0.5, fuse_dropped=True))),
    ("bert", lambda: TokenMergePass(TokenMerge(r=3))),
    ("bert", lambda: TokenPrunePass(TokenPrune(keep=0.7))),
    ("gpt", lambda: TokenPrunePass(TokenPrune(keep=0.5, layers=[0]))),
]


@pytest.mark.parametrize("family,make", BACKEND_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BACKEND_CASES)])
def test_reduced_graphs_run_on_onnxruntime(family, make):
    from nnforge.backends.base import get_backend
    from nnforge.targets import get_target

    g, x = fused(family)
    g, _ = run_pass(make(), g)
    art = get_backend("onnxrt").build(g, get_target("cpu"))
    got, want = art.run(x)[0], interpret(g, x)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _token_ops_graph(batch, seq):
    """token_merge, token_prune (fused, both ends protected) and attention_scores on one input; hidden 38
    is two whole vectors and a tail on AVX2, one and a tail on AVX-512 (TVM vectorises the merge along it)."""
    g = Graph()
    x = g.add_input("x", TensorType((batch, seq, 38)))
    m = g.add_input("m", TensorType((batch, seq, 6)))
    s = g.add_input("s", TensorType((batch, seq)))
    sc = g.add_input("sc", TensorType((batch, seq)))
    merged = g.add_node("token_merge", [x, m, s], {"r": 3, "protect_first": 1}).outputs
    pruned = g.add_node(
        "token_prune",
        [x, sc, s],
        {"keep": keep_count(seq, 0.5, 2), "protect_first": 1, "protect_last": 1, "fuse_dropped": True},
    ).outputs
    plain = g.add_node("token_prune", [x, sc], {"keep": keep_count(seq, 0.7, 1), "protect_first": 1}).outputs
    scores = [
        g.op("attention_scores", x, x, num_heads=2, query=q, is_causal=i == 2)
        for i, q in enumerate(("first", "last", "mean"))
    ]
    g.outputs = merged + pruned + plain + scores
    verify(g)
    return g


def _token_inputs(batch: int, seq: int):
    sizes = rng.integers(0, 4, (batch, seq)).astype(np.float32)  # zeros are padding: merged first
    sizes[:, 0] = 1
    return [randn(batch, seq, 38), randn(batch, seq, 6), sizes, rng.random((batch, seq)).astype(np.float32)]


@pytest.mark.parametrize("batch,seq", [(3, 17), ("batch", 17), ("batch", "seq")])
def test_token_ops_on_tvm_match_the_interpreter(batch, seq):
    from nnforge.backends.base import get_backend
    from nnforge.targets import get_target

    g = _token_ops_graph(batch, seq)
    art = get_backend("tvm").build(g, get_target("cpu"))
    for n in [17] if seq == 17 else [11, 16]:
        x = _token_inputs(3, n)
        got, want = art.run(x), interpret(g, x)
        assert [a.shape for a in got] == [a.shape for a in want]
        assert got[0].shape[1] == n - 3 and got[1].sum() == x[2].sum()  # r merged, sizes conserved
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


TVM_CASES = [BACKEND_CASES[i] for i in (1, 2, 4)]  # ViT prune+fuse, BERT merge with padding, GPT prefill prune


@pytest.mark.parametrize("family,make", TVM_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(TVM_CASES)])
def test_reduced_graphs_run_on_tvm(family, make):
    from nnforge.backends.base import get_backend
    from nnforge.targets import get_target

    g, x = fused(family)
    g, _ = run_pass(make(), g)
    assert not get_backend("tvm").supports(g, "cpu")
    art = get_backend("tvm").build(g, get_target("cpu"))
    got, want = art.run(x)[0], interpret(g, x)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_token_merged_vit_compiles_on_tvm_without_fallback():
    import nnforge

    zm = zoo.build("vit", "tiny")
    fast = nnforge.compile(
        zm.model,
        zm.inputs,
        backend="tvm",
        tokens=nnforge.TokenMerge(r=3),
        fallback=False,
        dynamic_shapes=zm.dynamic_shapes,
        cache=False,
    )
    assert fast.backend == "tvm" and sum(n.op == "token_merge" for n in fast.graph.nodes) == 2
    x = [a.numpy() for a in zm.inputs]
    np.testing.assert_allclose(fast(*x), interpret(fast.graph, x)[0], rtol=1e-4, atol=1e-5)
    x4 = [randn(4, *x[0].shape[1:])]  # the batch stays symbolic
    np.testing.assert_allclose(fast(*x4), interpret(fast.graph, x4)[0], rtol=1e-4, atol=1e-5)


# ---- the real MiniLM-L6 sentence encoder ---------------------------------------------


@functools.lru_cache(maxsize=1)
def _minilm():
    from sentences import SENTENCES

    from nnforge.frontend.torch import import_torch
    from nnforge.models.pretrained import minilm

    model, tok = minilm()
    texts = [" ".join(SENTENCES[i : i + 3]) for i in range(0, 30, 2)]  # ~35 tokens each, padded per batch

    def batch(ts):
        e = tok(ts, padding=True, return_tensors="np")
        return [e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)]

    batches = [batch(texts[:8]), batch(texts[8:])]
    dims = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)},) * 2
    graph = prepare(import_torch(model, tuple(torch.from_numpy(a) for a in batches[0]), dynamic_shapes=dims))
    with torch.no_grad():
        eager = [model(*(torch.from_numpy(a) for a in b)).numpy() for b in batches]
    return graph, batches, eager


def test_quality_on_minilm():
    from nnforge.passes.budget import cosine_quality, quality_drop

    graph, batches, eager = _minilm()
    info = find_blocks(graph)
    assert len(info.blocks) == 6 and info.padding_mask is not None and info.readout == "mean"
    ref = [interpret(graph, b)[0] for b in batches]
    np.testing.assert_allclose(np.concatenate(ref), np.concatenate(eager), rtol=1e-4, atol=1e-5)
    drops = []
    for r in (1, 2, 4):
        g, _ = run_pass(TokenMergePass(TokenMerge(r=r)), graph.copy())
        drops.append(quality_drop(cosine_quality, [interpret(g, b)[0] for b in batches], ref))
    assert drops[0] <= 0.01 and drops[0] < drops[1] < drops[2] <= 0.2, drops
