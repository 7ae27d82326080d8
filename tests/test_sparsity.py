"""Sparsity passes: masks (unstructured, 2:4), magnitude vs Wanda, structured head/FFN pruning that
shrinks matrices exactly as zeroing the removed units would, and CSR storage."""

import numpy as np
import pytest

from nnforge import PassContext, PassManager
from nnforge.errors import NnforgeError
from nnforge.ir import Graph, TensorType, interpret, load_graph, save_graph, verify
from nnforge.models import zoo
from nnforge.passes import sparsity as S
from nnforge.passes.manager import make_pass
from nnforge.passes.sparsity import Sparsity

rng = np.random.default_rng(9)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run(passes, g, inputs, settings=None):
    """Run the named passes, each with ``settings`` (a Sparsity; None: the passes' defaults)."""
    pm = PassManager([make_pass(p, settings) for p in passes], check=True)
    out = pm.run(g.copy(), PassContext(sample_inputs=inputs, calibration=[inputs]))
    verify(out)
    return out, pm.records


def weights(g, op="linear"):
    return [g.constant(n.inputs[1]) for n in g.nodes if n.op == op]


def mlp(k=64, hidden=128, out=16):
    g = Graph("mlp")
    x = g.add_input("x", TensorType(("batch", k)))
    h = g.op(
        "linear_act",
        x,
        g.add_constant(randn(hidden, k), "fc1_weight"),
        g.add_constant(randn(hidden), "fc1_bias"),
        act="relu",
    )
    g.outputs = [
        g.op("linear", h, g.add_constant(randn(out, hidden), "fc2_weight"), g.add_constant(randn(out), "fc2_bias"))
    ]
    return g


def test_masks_are_exact():
    score = rng.random((6, 16))
    m = S.keep_mask(score, 0.5, (2, 4))
    assert np.all(m.reshape(6, 4, 4).sum(-1) == 2)
    kept = np.where(m, score, np.inf).reshape(6, 4, 4).min(-1)
    dropped = np.where(~m, score, -np.inf).reshape(6, 4, 4).max(-1)
    assert np.all(kept >= dropped)  # the two largest of every four stay
    m = S.keep_mask(score, 0.25, None)
    assert np.all(m.sum(1) == 12)


def test_2_4_pattern_holds_in_the_rewritten_graph():
    g = mlp()
    out, records = run(["prune_2_4"], g, [randn(32, 64)])
    for w in weights(out, "linear_act") + weights(out):
        assert np.all((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2)
        assert (w == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert [l["sparsity"] for l in records[0].stats["layers"]] == [0.5, 0.5]
    assert all(l["pattern"] == "2:4" for l in records[0].stats["layers"])


def test_wanda_differs_from_magnitude_when_activations_are_skewed():
    g = mlp()
    x = randn(256, 64) * np.geomspace(0.01, 10, 64).astype(np.float32)  # a few input channels dominate
    mag, rec_mag = run(["prune_magnitude"], g, [x])
    wanda, records = run(["prune_wanda"], g, [x])
    w_mag, w_wanda = weights(mag, "linear_act")[0], weights(wanda, "linear_act")[0]
    assert (w_mag == 0).mean() == pytest.approx(0.5) and (w_wanda == 0).mean() == pytest.approx(0.5)
    assert np.mean((w_mag == 0) != (w_wanda == 0)) > 0.2
    # on the skewed layer, keeping the weights that meet large inputs loses far less of its output
    fc1_mag, fc1_wanda = rec_mag[0].stats["layers"][0], records[0].stats["layers"][0]
    assert fc1_wanda["method"] == "wanda" and fc1_wanda["rel_error"] < 0.5 * fc1_mag["rel_error"]
    ref = interpret(g, [x])[0]
    err = lambda q: np.linalg.norm(interpret(q, [x])[0] - ref) / np.linalg.norm(ref)  # noqa: E731
    assert err(wanda) < err(mag)


def test_settings_are_validated_and_map_to_passes():
    with pytest.raises(NnforgeError, match="N:M"):
        Sparsity(pattern="4:2")
    with pytest.raises(NnforgeError, match="method"):
        Sparsity(method="random")
    assert Sparsity(method="wanda", pattern="2:4", heads=1, ffn=0.25, storage="csr").passes() == [
        "prune_heads",
        "prune_ffn",
        "prune_wanda",
        "compress_sparse",
    ]
    assert Sparsity(ratio=0.0, heads=2).passes() == ["prune_heads"]


# ---- structured ------------------------------------------------------------------------


def attention_block(separate_qkv: bool, e=32, heads=4, class_query=False):
    g = Graph("attn")
    x = g.add_input("x", TensorType(("batch", 5, e)))
    if separate_qkv:
        q, k, v = (
            g.op("linear", x, g.add_constant(randn(e, e) * 0.3, f"{n}_weight"), g.add_constant(randn(e), f"{n}_bias"))
            for n in "qkv"
        )
    else:
        qkv = g.op(
            "linear", x, g.add_constant(randn(3 * e, e) * 0.3, "qkv_weight"), g.add_constant(randn(3 * e), "qkv_bias")
        )
        q, k, v = (g.op("slice", qkv, axis=-1, start=i * e, end=(i + 1) * e) for i in range(3))
        if class_query:  # as sink_slices leaves a last block read only at its class token
            q = g.op("slice", g.op("slice", qkv, axis=1, start=0, end=1), axis=-1, start=0, end=e)
    att = g.op("attention", q, k, v, num_heads=heads)
    g.outputs = [
        g.op("linear", att, g.add_constant(randn(e, e) * 0.3, "out_weight"), g.add_constant(randn(e), "out_bias"))
    ]
    return g


@pytest.mark.parametrize("separate_qkv, class_query", [(True, False), (False, False), (False, True)])
def test_head_pruning_shrinks_matrices_and_equals_zeroing_the_heads(separate_qkv, class_query):
    g = attention_block(separate_qkv, class_query=class_query)
    x = randn(3, 5, 32)
    out, records = run(["prune_heads"], g, [x], Sparsity(heads=1))
    att = next(n for n in out.nodes if n.op == "attention")
    assert att.attrs["num_heads"] == 3
    shapes = [w.shape for w in weights(out)]
    assert shapes == ([(24, 32)] * 3 + [(32, 24)] if separate_qkv else [(72, 32), (32, 24)])
    (dropped,) = records[0].stats["layers"][0]["removed"]
    # reference: the original model with that head's attention output set to zero
    _, vals = interpret(g, [x], keep_all=True)
    att_node = next(n for n in g.nodes if n.op == "attention")
    o = vals[att_node.output].copy()
    o[..., dropped * 8 : (dropped + 1) * 8] = 0
    wo, bo = g.constant(g.nodes[-1].inputs[1]), g.constant(g.nodes[-1].inputs[2])
    np.testing.assert_allclose(interpret(out, [x])[0], o @ wo.T + bo, rtol=1e-4, atol=1e-5)
    # the weakest head went
    scores = records[0].stats["layers"][0]["scores"]
    assert dropped == int(np.argmin(scores))


def test_head_pruning_cuts_a_per_head_mask_and_equals_zeroing_the_heads():
    """A mask with a head axis (torch's MultiheadAttention export of a key padding mask) is cut to the kept
    heads; the result is the original model with the dropped heads' outputs set to zero."""
    e, heads = 32, 4
    g = Graph("attn")
    x = g.add_input("x", TensorType(("batch", 5, e)))
    mask = g.add_input("mask", TensorType(("batch", heads, 5, 5)))
    q, k, v = (g.op("linear", x, g.add_constant(randn(e, e) * 0.3, f"{n}_weight")) for n in "qkv")
    att = g.op("attention", q, k, v, mask, num_heads=heads)
    g.outputs = [g.op("linear", att, g.add_constant(randn(e, e) * 0.3, "out_weight"))]
    inputs = [randn(3, 5, e), np.where(rng.random((3, heads, 5, 5)) < 0.3, -1e9, 0).astype(np.float32)]
    out, records = run(["prune_heads"], g, inputs, Sparsity(heads=2))
    dropped = records[0].stats["layers"][0]["removed"]
    assert len(dropped) == 2 and [n.attrs["num_heads"] for n in out.nodes if n.op == "attention"] == [2]
    _, vals = interpret(g, inputs, keep_all=True)
    o = vals[next(n for n in g.nodes if n.op == "attention").output].copy()
    for h in dropped:
        o[..., h * 8 : (h + 1) * 8] = 0
    np.testing.assert_allclose(interpret(out, inputs)[0], o @ g.constant(g.nodes[-1].inputs[1]).T, rtol=1e-4, atol=1e-5)


def test_head_pruning_on_a_fused_zoo_vit_runs():
    import realmodels

    from nnforge.frontend.torch import import_torch

    zm = zoo.build("vit")
    g = realmodels.fuse(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes))
    x = [zm.inputs[0].numpy()]
    out, records = run(["prune_heads"], g, x, Sparsity(heads=0.5))
    assert [n.attrs["num_heads"] for n in out.nodes if n.op == "attention"] == [2, 2]
    assert records[0].stats["heads_removed"] == 4
    assert records[0].stats["bytes_after"] < records[0].stats["bytes_before"]
    assert interpret(out, x)[0].shape == interpret(g, x)[0].shape


def test_ffn_pruning_equals_zeroing_the_neurons():
    g = mlp()
    x = randn(64, 64)
    out, records = run(["prune_ffn"], g, [x], Sparsity(ffn=0.25))
    assert [w.shape for w in weights(out, "linear_act") + weights(out)] == [(96, 64), (16, 96)]
    layer = records[0].stats["layers"][0]
    assert layer["name"] == "fc1_weight" and layer["neurons_removed"] == 32
    # which neurons went: the rows of fc1 that are no longer there
    w1, w1p = g.constant(g.nodes[0].inputs[1]), weights(out, "linear_act")[0]
    kept = [int(np.flatnonzero((w1 == row).all(1))[0]) for row in w1p]
    _, vals = interpret(g, [x], keep_all=True)
    h = np.zeros_like(vals[g.nodes[0].output])
    h[:, kept] = vals[g.nodes[0].output][:, kept]
    w2, b2 = g.constant(g.nodes[1].inputs[1]), g.constant(g.nodes[1].inputs[2])
    np.testing.assert_allclose(interpret(out, [x])[0], h @ w2.T + b2, rtol=1e-4, atol=1e-4)


def test_digits_vit_survives_removing_one_head_per_layer(digits_vit):
    import realmodels

    graph, images, labels, cal = realmodels.digits(digits_vit)
    base = realmodels.top1(graph, images, labels)
    out = PassManager([S.PruneHeads(Sparsity(heads=1))]).run(graph.copy(), PassContext(calibration=[[cal]]))
    assert {n.attrs["num_heads"] for n in out.nodes if n.op == "attention"} == {3}
    assert realmodels.top1(out, images, labels) >= base - 0.1


# ---- compressed storage ----------------------------------------------------------------


def test_compress_sparse_stores_csr_and_keeps_numerics(tmp_path):
    g = mlp(k=256, hidden=256)
    x = randn(16, 256)
    out, records = run(["prune_magnitude", "compress_sparse"], g, [x], Sparsity(ratio=0.75))
    assert [n.op for n in out.nodes] == ["sparse_linear", "sparse_linear"]
    assert out.nodes[0].attrs["act"] == "relu"
    stats = records[1].stats
    assert stats["bytes_after"] < 0.5 * stats["bytes_before"]
    assert records[1].max_error == 0.0
    save_graph(out, tmp_path)
    back = load_graph(tmp_path)
    np.testing.assert_array_equal(interpret(back, [x])[0], interpret(out, [x])[0])


def test_compress_sparse_leaves_dense_layers_dense():
    out, records = run(["compress_sparse"], mlp(), [randn(4, 64)])
    assert [n.op for n in out.nodes] == ["linear_act", "linear"] and not records[0].changed


def test_sparse_linear_runs_on_onnxruntime_from_compressed_weights():
    from nnforge.backends import onnxrt
    from nnforge.targets import get_target

    g = Graph("mlp3d")
    x = g.add_input("x", TensorType(("batch", "seq", 128)))
    h = g.op("linear_act", x, g.add_constant(randn(192, 128), "fc1_weight"), g.add_constant(randn(192)), act="gelu")
    g.outputs = [g.op("linear", h, g.add_constant(randn(16, 192), "fc2_weight"))]
    inputs = [randn(2, 3, 128)]
    out, _ = run(["prune_wanda", "compress_sparse"], g, inputs, Sparsity(ratio=0.75))
    model = onnxrt.to_onnx(out, contrib=True)
    onnxrt.check(model)
    sess = onnxrt.make_session(model.SerializeToString(), get_target("cpu"))
    got = sess.run(None, {"x": inputs[0]})[0]
    np.testing.assert_allclose(got, interpret(out, inputs)[0], rtol=1e-4, atol=1e-4)
    assert len(model.SerializeToString()) < 0.5 * sum(a.nbytes for a in g.constants.values())


def test_compile_takes_sparsity_settings():
    import torch

    import nnforge

    zm = zoo.build("vit")
    cm = nnforge.compile(
        zm.model,
        zm.inputs,
        "cpu",
        dynamic_shapes=zm.dynamic_shapes,
        progress=False,
        sparsity=Sparsity(method="wanda", pattern="2:4", heads=1, ffn=0.25),
        calibration=[(torch.randn(4, 3, 32, 32),)],
    )
    record = next(r for r in cm.records if r.name == "sparsity")
    assert set(record.stats) >= {"prune_heads", "prune_ffn", "prune_wanda"}
    assert {n.attrs["num_heads"] for n in cm.graph.nodes if n.op == "attention"} == {3}
    fc1 = [cm.graph.constant(n.inputs[1]) for n in cm.graph.nodes if n.op == "linear_act"]
    assert all(w.shape[0] == 96 and np.all((w.reshape(96, -1, 4) != 0).sum(-1) <= 2) for w in fc1)
    assert cm(*zm.inputs).shape == (2, 10)


def test_sparse_linear_runs_on_tvm():
    from nnforge.backends import tvm as tb

    out, _ = run(["prune_magnitude", "compress_sparse"], mlp(k=64, hidden=96), [randn(8, 64)], Sparsity(ratio=0.75))
    assert [n.op for n in out.nodes] == ["sparse_linear", "sparse_linear"]
    x = [randn(5, 64)]
    np.testing.assert_allclose(tb.build(out, "cpu").run(x)[0], interpret(out, x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio,kernel", [(0.95, True), (0.5, False)])
def test_tvm_uses_the_csr_kernel_only_for_very_sparse_layers(ratio, kernel):
    """At or below tvm_sparse.MAX_DENSITY of stored weights the CSR kernel runs (no dense weight exists at
    run time); denser layers are densified at load. Both match the interpreter for any row count: the
    kernel's 64-row tiles and its scalar tail."""
    from nnforge.backends import tvm as tb

    g = Graph("mlp3d")
    x = g.add_input("x", TensorType(("batch", "seq", 128)))
    h = g.op("linear_act", x, g.add_constant(randn(192, 128), "fc1_weight"), g.add_constant(randn(192)), act="gelu")
    g.outputs = [g.op("linear", h, g.add_constant(randn(32, 192), "fc2_weight"))]
    out, _ = run(["prune_magnitude", "compress_sparse"], g, [randn(2, 3, 128)], Sparsity(ratio=ratio))
    assert [n.op for n in out.nodes] == ["sparse_linear", "sparse_linear"]
    names = [gv.name_hint for gv in tb.BACKEND.kernels(out, "cpu").functions]
    assert sum(n.startswith("csr_matmul") for n in names) == (2 if kernel else 0)
    art = tb.build(out, "cpu")
    for shape in [(1, 1, 128), (2, 33, 128), (1, 130, 128)]:  # 1 row, one tile and a tail, two tiles and a tail
        xs = [randn(*shape)]
        np.testing.assert_allclose(art.run(xs)[0], interpret(out, xs)[0], rtol=1e-4, atol=1e-4)
