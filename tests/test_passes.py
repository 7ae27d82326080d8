"""Pass manager (records, check mode, IR dumps) and the cleanup passes, each against the interpreter."""

import numpy as np
import pytest

import nnforge
from nnforge import NnforgeError, NumericsError, Pass, PassContext, PassManager, PassResult
from nnforge.ir import Graph, TensorType, interpret, verify

rng = np.random.default_rng(1)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run_pass(name, g, x):
    ref = interpret(g, [x])
    pm = PassManager([name], check=True)
    g2 = pm.run(g, PassContext(sample_inputs=[x]))
    verify(g2)
    np.testing.assert_allclose(interpret(g2, [x])[0], ref[0], rtol=1e-6, atol=1e-6)
    return g2, pm.records[0]


def test_dce_removes_dead_nodes_and_constants():
    g = Graph()
    x = g.add_input("x", TensorType((2, 4)))
    w = g.add_constant(randn(4, 4), "unused_w")
    g.op("matmul", x, w)  # dead
    g.outputs = [g.op("relu", x)]
    g2, rec = run_pass("dce", g, randn(2, 4))
    assert [n.op for n in g2.nodes] == ["relu"] and not g2.constants
    assert rec.changed and rec.nodes_before == 2 and rec.nodes_after == 1
    _, rec = run_pass("dce", g2, randn(2, 4))
    assert not rec.changed


def test_cse_merges_twins_but_not_different_attrs():
    g = Graph()
    x = g.add_input("x", TensorType((2, 4)))
    a, b = g.op("softmax", x, axis=1), g.op("softmax", x, axis=1)
    c = g.op("softmax", x, axis=0)  # different attribute: must stay
    g.add_constant(np.ones(4, np.float32), "one_a")
    k1, k2 = g.add_constant(np.ones(4, np.float32), "k1"), g.add_constant(np.ones(4, np.float32), "k2")
    g.outputs = [g.op("add", g.op("add", g.op("mul", a, k1), g.op("mul", b, k2)), c)]
    g2, rec = run_pass("cse", g, randn(2, 4))
    ops = [n.op for n in g2.nodes]
    assert ops.count("softmax") == 2 and ops.count("mul") == 1
    assert rec.stats["constants_merged"] >= 1


def test_constant_folding_weights_only_subgraph():
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 4)))
    w = g.add_constant(randn(4, 4), "w")
    scale = g.add_constant(np.float32(2.0), "s")
    wt = g.op("permute", g.op("mul", w, scale), perm=[1, 0])  # depends only on constants
    g.outputs = [g.op("matmul", x, wt)]
    g2, rec = run_pass("fold_constants", g, randn(3, 4))
    assert [n.op for n in g2.nodes] == ["matmul"] and rec.stats["nodes_folded"] == 2


def test_constant_folding_leaves_symbolic_shapes_alone():
    g = Graph()
    x = g.add_input("x", TensorType(("seq", 4)))
    pos = g.op("arange", end="seq")  # depends on the run-time size: not foldable
    g.outputs = [g.op("add", x, g.op("unsqueeze", g.op("cast", pos, dtype="float32"), axes=[1]))]
    g2, rec = run_pass("fold_constants", g, randn(5, 4))
    assert not rec.changed and "arange" in [n.op for n in g2.nodes]


def test_canonicalize_removes_noops_and_cancels_transposes():
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 3, 4)))
    t = g.op("permute", g.op("permute", x, perm=[0, 2, 1]), perm=[0, 2, 1])  # cancels
    r = g.op("reshape", g.op("reshape", t, shape=["batch", 12]), shape=["batch", 3, 4])  # no-op pair
    c = g.op("cast", r, dtype="float32")
    s = g.op("slice", c, axis=1, start=0)  # full slice
    g.outputs = [g.op("relu", s)]
    g2, rec = run_pass("canonicalize", g, randn(2, 3, 4))
    assert [n.op for n in g2.nodes] == ["relu"]
    assert rec.stats["remove_noop"] >= 3 and rec.stats["compose_permutes"] + rec.stats["merge_reshapes"] >= 2


def test_canonicalize_keeps_real_transposes():
    g = Graph()
    x = g.add_input("x", TensorType((2, 3, 4)))
    g.outputs = [g.op("permute", g.op("permute", x, perm=[0, 2, 1]), perm=[1, 0, 2])]
    g2, _ = run_pass("canonicalize", g, randn(2, 3, 4))
    assert [(n.op, n.attrs["perm"]) for n in g2.nodes] == [("permute", [2, 0, 1])]


class BreakSoftmax(Pass):
    """A deliberately wrong 'lossless' pass: swaps softmax for exp."""

    name = "break_softmax"

    def run(self, graph, ctx):
        changed = False
        for n in graph.nodes:
            if n.op == "softmax":
                n.op, n.attrs, changed = "exp", {}, True
        return PassResult(changed)


class NoisyLossy(BreakSoftmax):
    name = "noisy_lossy"
    lossy = True


def _softmax_graph():
    g = Graph()
    x = g.add_input("x", TensorType((2, 5)))
    g.outputs = [g.op("softmax", g.op("relu", x), axis=-1)]
    return g


def test_check_mode_names_the_first_pass_that_broke_numerics():
    pm = PassManager(["dce", BreakSoftmax(), "cse"], check=True)
    with pytest.raises(NumericsError, match="break_softmax.*#2"):
        pm.run(_softmax_graph(), PassContext(sample_inputs=[randn(2, 5)]))


def test_lossy_pass_reports_its_error_instead_of_failing():
    pm = PassManager(["dce", NoisyLossy()], check=True)
    pm.run(_softmax_graph(), PassContext(sample_inputs=[randn(2, 5)]))
    assert pm.records[1].lossy and pm.records[1].max_error > 1e-2
    assert pm.records[0].max_error == 0.0


def test_records_time_and_counts_and_dump_ir(tmp_path, monkeypatch):
    monkeypatch.setenv("NNFORGE_DUMP_IR", str(tmp_path))
    pm = PassManager("O2", check=True)
    pm.run(_softmax_graph(), PassContext(sample_inputs=[randn(2, 5)]))
    assert [r.name for r in pm.records][:2] == ["dce", "canonicalize"]
    assert all(r.seconds >= 0 and r.nodes_before >= r.nodes_after for r in pm.records)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[0] == "00_input.ir" and len(dumps) == len(pm.records) + 1
    assert "softmax(" in (tmp_path / dumps[-1]).read_text()


def test_unknown_pipeline_and_pass_are_named():
    with pytest.raises(NnforgeError, match="O9"):
        PassManager("O9")
    with pytest.raises(NnforgeError, match="no_such_pass"):
        PassManager(["dce", "no_such_pass"])


def test_a_pipeline_against_the_declared_order_is_refused_naming_both_passes():
    # sink_slices trims the last transformer block, which token merging must still find
    with pytest.raises(NnforgeError, match=r"'token_merge' \(#3\) must run before 'sink_slices' \(#2\).*blocks"):
        PassManager(["dce", "sink_slices", "token_merge"])
    with pytest.raises(NnforgeError, match=r"'prune_magnitude' \(#2\) must run before 'compress_sparse' \(#1\)"):
        PassManager(["compress_sparse", "prune_magnitude"])
    with pytest.raises(NnforgeError, match=r"'smoothquant' \(#2\) must run before 'quantize_w8a8' \(#1\)"):
        PassManager(["quantize_w8a8", "smoothquant"])
    assert [p.name for p in PassManager(["token_merge", "sink_slices"]).passes] == ["token_merge", "sink_slices"]


def test_split_after_moves_only_what_must_follow():
    from nnforge.passes.manager import resolve_pipeline, split_after

    before, after = split_after(resolve_pipeline("O2"), resolve_pipeline(["token_merge"]))
    assert [p.name for p in after] == ["sink_slices"]
    assert [p.name for p in before] == [n for n in nnforge.PIPELINES["O2"] if n != "sink_slices"]
    assert split_after(resolve_pipeline("O2"), resolve_pipeline(["quantize_int8"]))[1] == []


def test_typed_options_reach_the_pass():
    from nnforge.passes.manager import make_pass
    from nnforge.passes.tokens import TokenMergePass

    seen = []

    class Spy(TokenMergePass):
        def run(self, graph, ctx):
            seen.append(self.options)
            return PassResult(False)

    PassManager([Spy(nnforge.TokenMerge(r=3, schedule="decreasing"))]).run(_softmax_graph())
    assert seen == [nnforge.TokenMerge(r=3, schedule="decreasing")]
    assert make_pass("token_merge").options == nnforge.TokenMerge()  # by name: the defaults
    made = nnforge.Quantize(weights="int4", group_size=32).make_pass()  # settings build their pass
    assert made.name == "quantize" and made.options.group_size == 32
    assert [p.options for p in PassManager([nnforge.SkipLayers(n=1)]).passes] == [nnforge.SkipLayers(n=1)]
    with pytest.raises(NnforgeError, match="takes TokenMerge options, got TokenPrune"):
        TokenMergePass(nnforge.TokenPrune())
    with pytest.raises(NnforgeError, match="'dce' takes no options"):
        make_pass("dce", nnforge.TokenMerge())
