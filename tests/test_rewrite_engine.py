"""The rewrite engine: use-lists kept by the Graph's edit API, pattern leaves/optional inputs/alternatives,
the worklist driver's round limit and linear work, and why a pattern did not match."""

import numpy as np
import pytest

from nnforge import PassContext, PassManager
from nnforge.errors import VerificationError
from nnforge.ir import Graph, TensorType, interpret, verify
from nnforge.ir.analysis import fusion_creates_cycle, fusion_cycle_local
from nnforge.ir.graph import ReadOnlyList
from nnforge.passes.pattern import (
    ANY,
    Const,
    OneOf,
    Opt,
    P,
    RewritePass,
    Rule,
    V,
    apply_rules,
    explain_match,
    match,
)

rng = np.random.default_rng(5)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def scanned_users(g):
    """What the use-lists must say, from a scan of the nodes."""
    out = {}
    for n in g.nodes:
        for v in n.inputs:
            if v is not None:
                out.setdefault(v, [])
                if n not in out[v]:
                    out[v].append(n)
    return out


def assert_use_lists_right(g):
    verify(g)
    want = scanned_users(g)
    for v in list(g.inputs) + list(g.const_values.values()) + [o for n in g.nodes for o in n.outputs]:
        assert set(g.users_of(v)) == set(want.get(v, [])), v
        assert g.has_users(v) == (v in want)
    nodes = g.nodes
    assert all(g.precedes(a, b) for a, b in zip(nodes, nodes[1:]))


# ---- use-lists ------------------------------------------------------------------------


def test_use_lists_follow_every_edit():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    a = g.op("exp", x)
    b = g.op("mul", a, a)  # one node reading a value twice
    c = g.op("add", b, x)
    g.outputs = [c]
    assert_use_lists_right(g)
    assert g.users_of(a) == [b.producer] and g.users()[a] == [b.producer, b.producer]

    n = g.add_node("neg", [x], before=b.producer)  # insert in the middle
    assert g.nodes.index(n) == 1
    assert_use_lists_right(g)
    b.producer.set_input(1, n.output)
    assert g.users_of(a) == [b.producer] and g.users_of(n.output) == [b.producer]
    assert_use_lists_right(g)
    c.producer.inputs = [b, n.output]
    assert g.users_of(x) == [a.producer, n]
    assert_use_lists_right(g)
    g.replace_all_uses(n.output, a)
    assert not g.has_users(n.output) and g.users_of(a) == [b.producer, c.producer]
    g.remove_node(n)
    assert_use_lists_right(g)
    assert g.users() == {x: [a.producer], a: [b.producer, b.producer, c.producer], b: [c.producer]}

    g.nodes = list(reversed(g.nodes))  # wholesale, then back in order
    g.toposort()
    assert [m.op for m in g.nodes] == ["exp", "mul", "add"]
    assert_use_lists_right(g)
    assert_use_lists_right(g.copy())


def test_many_inserts_at_one_spot_keep_order_and_use_lists():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    last = g.op("exp", x).producer
    inserted = [g.add_node("neg", [x], before=last) for _ in range(100)]  # order keys run out of room: renumbered
    assert g.nodes == inserted + [last]
    assert len(g.users_of(x)) == 101
    assert_use_lists_right(g)


def test_inputs_and_stale_node_lists_refuse_edits_that_bypass_the_use_lists():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    y = g.op("exp", x)
    node = y.producer
    assert isinstance(node.inputs, ReadOnlyList) and node.inputs == [x]
    with pytest.raises(TypeError, match="read-only"):
        node.inputs[0] = y
    with pytest.raises(TypeError, match="read-only"):
        node.inputs.append(x)
    old = g.nodes
    g.op("neg", y)
    with pytest.raises(TypeError, match="stale"):
        old.append(node)


def test_node_list_edited_in_place_is_adopted():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    a, b = g.op("exp", x), None
    b = g.op("neg", a)
    g.outputs = [b]
    extra = g.make_node("abs", [b])
    g.nodes.append(extra)  # the old style still works: the graph takes the list at its next query
    assert g.users_of(b) == [extra] and extra.graph is g
    g.outputs = [extra.output]
    del g.nodes[0]  # exp gone: verify names the dangling use
    with pytest.raises(VerificationError, match="used before it is defined"):
        verify(g)


def test_verifier_catches_a_stale_use_list():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    y = g.op("exp", x)
    g.outputs = [g.op("neg", y)]
    verify(g)
    neg = g.outputs[0].producer
    neg._inputs = ReadOnlyList([x])  # an edit around the API: the use-lists still say neg reads y
    with pytest.raises(VerificationError, match="use-list of %x is stale"):
        verify(g)
    neg._inputs = ReadOnlyList([y])
    verify(g)
    g._uses[x][neg] = 1  # a use-list naming a node that does not read the value
    with pytest.raises(VerificationError, match="use-list of %x is stale: it lists node neg"):
        verify(g)


def test_local_cycle_search_agrees_with_networkx():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    a = g.op("exp", x)
    b = g.op("neg", a)
    c = g.op("add", a, b)
    d = g.op("mul", c, a)
    g.outputs = [d]
    nodes = g.nodes
    for i in range(len(nodes)):
        for j in range(i + 1, len(nodes)):
            group = [nodes[i], nodes[j]]
            assert (fusion_cycle_local(g, group) is not None) == fusion_creates_cycle(g, group), group
    assert fusion_cycle_local(g, [a.producer, c.producer]) is b.producer


# ---- pattern features ----------------------------------------------------------------


def _is_scalar(a):
    return a.size == 1


def test_optional_input_matches_with_and_without_it():
    g = Graph()
    x = g.add_input("x", TensorType((2, 8)))
    w, b = g.add_constant(randn(4, 8), "w"), g.add_constant(randn(4), "b")
    pat = P("linear", "x", "w", Opt("b"))
    with_bias, without, explicit_none = g.op("linear", x, w, b), g.op("linear", x, w), g.op("linear", x, w, None)
    assert match(pat, with_bias)["b"] is b
    assert "b" not in match(pat, without)
    assert match(pat, explicit_none)["b"] is None  # present but None: bound, as a plain name would
    assert match(P("linear", "x", "w", Opt(Const("b"))), with_bias)["b"] is b
    assert match(P("linear", "x", "w", Opt(Const("b"))), explicit_none) is None
    assert match(P("linear", "x"), with_bias) is None  # without Opt the count is exact
    with pytest.raises(ValueError, match="optional inputs must come last"):
        P("linear", Opt("x"), "w")


def test_leaf_attribute_and_node_predicates():
    g = Graph()
    x = g.add_input("x", TensorType((2, 8)))
    i = g.add_input("i", TensorType((2, 8), "int64"))
    half = g.add_constant(np.float32(0.5), "half")
    vec = g.add_constant(randn(8), "vec")
    y = g.op("mul", x, half)
    assert match(P("mul", V("x", const=False, rank=2), Const("c", where=_is_scalar)), y)["c"] is half
    assert match(P("mul", "x", Const("c", where=_is_scalar)), g.op("mul", x, vec)) is None
    assert match(P("mul", Const("c"), ANY), y) is None  # x is not a constant
    assert match(P("mul", V(dtype="int64"), ANY), y) is None
    assert match(P("mul", V(dtype="int64"), ANY), g.op("mul", i, i)) is not None
    s = g.op("softmax", x, axis=-1)
    assert match(P("softmax", ANY, axis=lambda a: a in (-1, 1)), s) is not None
    assert match(P("softmax", ANY, axis=lambda a: a == 0), s) is None
    assert match(P("softmax", ANY, where=lambda n: n.output.type.rank == 2), s) is not None
    assert match(P("softmax", ANY, where=lambda n: n.output.type.rank == 3), s) is None


def test_one_of_offers_each_alternative_to_the_check_in_turn():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    y = g.op("exp", g.op("neg", x))
    pat = OneOf(P("exp", P("neg", "a")), P("exp", "a"))
    assert match(pat, y)["a"] is x  # the first that fits
    seen = []
    rule = Rule(
        "pick", pat, lambda m, b: b.op("abs", m["a"]), check=lambda m, g: seen.append(m["a"]) or m["a"] is not x
    )  # refuses the first alternative
    g.outputs = [y]
    assert apply_rules(g, [rule])["pick"] == 1
    assert seen[:2] == [x, y.producer.inputs[0]] and [n.op for n in g.nodes] == ["neg", "abs"]


def test_one_rule_with_opt_fuses_linear_activation_with_and_without_bias():
    for with_bias in (True, False):
        g = Graph()
        x = g.add_input("x", TensorType((3, 8)))
        args = [x, g.add_constant(randn(4, 8), "w")] + ([g.add_constant(randn(4), "b")] if with_bias else [])
        g.outputs = [g.op("relu", g.op("linear", *args))]
        xs = [randn(3, 8)]
        ref = interpret(g, xs)
        pm = PassManager(["fuse_linear_act"], check=True, tolerance=1e-6)
        out = pm.run(g, PassContext(sample_inputs=xs))
        assert [n.op for n in out.nodes] == ["linear_act"] and len(out.nodes[0].inputs) == len(args)
        assert pm.records[0].stats == {"linear_relu": 1}
        np.testing.assert_allclose(interpret(out, xs)[0], ref[0], rtol=1e-6)


# ---- the driver ----------------------------------------------------------------------


class _Forever(RewritePass):
    """exp(x) -> exp(x): matches its own result, so it never reaches a fixed point."""

    name = "forever"
    rules = [Rule("renew_exp", P("exp", "x"), lambda m, b: b.op("exp", m["x"]))]


def test_round_limit_warns_naming_pass_and_rule_and_counts_a_stat():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    g.outputs = [g.op("exp", x)]
    stats = {}
    with pytest.warns(RuntimeWarning, match=r"forever: rewriting stopped at the round limit \(5\).*renew_exp"):
        counts = apply_rules(g, _Forever.rules, max_rounds=5, name="forever", stats=stats)
    assert counts["renew_exp"] == 5 and stats["round_limit_hit"] == 1 and stats["rounds"] == 5
    verify(g)
    with pytest.warns(RuntimeWarning, match="forever"):
        res = _Forever().run(g, PassContext())
    assert res.stats["round_limit_hit"] == 1


def _mlp_chain(blocks):
    """blocks x (matmul by a constant + bias + relu, then a double negation): fuse_linear_act and a neg rule's work."""
    g = Graph()
    h = g.add_input("x", TensorType((2, 8)))
    for _ in range(blocks):
        y = g.op("add", g.op("matmul", h, g.add_constant(randn(8, 8), "w")), g.add_constant(randn(8), "b"))
        h = g.op("neg", g.op("neg", g.op("relu", y)))
    g.outputs = [h]
    return g


def test_driver_work_grows_linearly_with_the_graph():
    double_neg = Rule("double_neg", P("neg", P("neg", "a")), lambda m, b: m["a"])
    rules = PassManager(["fuse_linear_act"]).passes[0].rules + [double_neg]
    attempts = []
    for blocks in (10, 40):
        g = _mlp_chain(blocks)
        stats = {}
        counts = apply_rules(g, rules, stats=stats)
        assert counts["linear_relu"] == counts["double_neg"] == blocks
        assert [n.op for n in g.nodes] == ["linear_act"] * blocks
        attempts.append(stats["match_attempts"])
    assert attempts[1] <= 4.5 * attempts[0]  # a rescan per rewrite would make this ~16x


# ---- why a pattern did not match ---------------------------------------------------------


def _scale_rule():
    return Rule(
        "fold_scale",
        P("mul", P("linear", "x", Const("w"), Opt("b"), bind="lin"), Const("c", where=_is_scalar), commutative=True),
        lambda m, b: b.op("linear", m["x"], b.const(b.constant_of(m["w"]) * b.constant_of(m["c"]), "w")),
        check=lambda m, g: "b" not in m,
    )


def _explain_graph():
    g = Graph()
    x = g.add_input("x", TensorType((2, 8)))
    wi = g.add_input("wi", TensorType((4, 8)))
    w, b = g.add_constant(randn(4, 8), "w"), g.add_constant(randn(4), "b")
    two, vec = g.add_constant(np.float32(2.0), "two"), g.add_constant(randn(4), "vec")
    shared = g.op("linear", x, w, name="shared")
    used = g.op("linear", x, w, name="used")
    g.outputs = [
        g.op("mul", g.op("relu", x), g.add_constant(randn(8), "k"), name="relu_scaled"),
        g.op("mul", g.op("linear", x, wi), two, name="input_weight"),
        g.op("mul", g.op("linear", x, w), vec, name="vector_scale"),
        g.op("mul", shared, two, name="shared_scaled"),
        shared,
        g.op("mul", used, two, name="used_scaled"),
        g.op("relu", used, name="relu_used"),
        g.op("mul", g.op("linear", x, w, b), two, name="biased"),
        g.op("mul", two, g.op("linear", x, w), name="good"),
    ]
    return g


def test_explain_match_says_why_per_candidate_root():
    g = _explain_graph()
    lines = explain_match(_scale_rule(), g)
    assert len(lines) == 7  # one per mul
    by_root = {line.split(" ")[2]: line for line in lines}
    assert "op differs: %relu is made by relu, pattern wants linear" in by_root["%relu_scaled"]
    assert "mul[0] > linear[1]: predicate false: %wi is not a constant" in by_root["%input_weight"]
    assert "predicate false: where=_is_scalar() is false for %vec" in by_root["%vector_scale"]
    assert by_root["%shared_scaled"].endswith("interior node linear %shared is a graph output")
    assert by_root["%used_scaled"].endswith("interior node linear %used has users outside the match: relu %relu_used")
    assert "check lambda returned False" in by_root["%biased"]
    assert by_root["%good"].endswith("would apply")
    good = g.outputs[-1]
    assert _scale_rule().why_not(good) is None
    assert "op differs" in _scale_rule().why_not(g.outputs[0])


def test_debug_match_env_prints_why_for_the_named_rule(monkeypatch, capsys):
    monkeypatch.setenv("NNFORGE_DEBUG_MATCH", "fold_scale")
    g = _explain_graph()
    counts = apply_rules(g, [_scale_rule(), Rule("other", P("relu", "x"), lambda m, b: None)])
    err = capsys.readouterr().err
    assert counts["fold_scale"] == 1
    assert "[nnforge match] fold_scale at %good (mul): applied" in err
    assert "[nnforge match] fold_scale at %relu_scaled (mul): no match: mul[0]: op differs" in err
    assert "fold_scale at %biased (mul): check lambda returned False" in err
    assert "other" not in err  # only the named rule speaks


def test_debug_match_names_attribute_binding_and_cycle_failures(monkeypatch, capsys):
    monkeypatch.setenv("NNFORGE_DEBUG_MATCH", "soft,same,cyc")
    g = Graph()
    x = g.add_input("x", TensorType((4, 4)))
    y = g.add_input("y", TensorType((4, 4)))
    a = g.op("neg", x)
    e = g.op("exp", a)
    g.outputs = [g.op("softmax", x, axis=0), g.op("add", x, y), g.op("add", a, e)]
    rules = [
        Rule("soft", P("softmax", "x", axis=-1), lambda m, b: None),
        Rule("same", P("add", "v", "v"), lambda m, b: None),
        Rule(
            "cyc", P("add", P("neg", "x", bind="n"), "e"), lambda m, b: b.op("add", m["x"], m["e"]), allow_shared=("n",)
        ),
    ]
    assert not any(apply_rules(g, rules).values())
    err = capsys.readouterr().err
    assert "soft at %softmax (softmax): no match: attribute mismatch: softmax.axis=0, pattern wants -1" in err
    assert "same at %add (add): no match: add[1]: binding conflict: v is already %x, here %y" in err
    assert "cyc at %add_" in err and "would create a cycle: exp %exp reads the match and feeds it" in err


def test_input_edit_of_a_node_taken_out_through_the_node_list():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    a = g.op("exp", x)
    b = g.op("neg", a)
    g.outputs = [a]
    g.nodes.remove(b.producer)
    b.producer.inputs = [x]  # no longer in the graph: nothing to keep
    assert b.producer.graph is None and g.users_of(x) == [a.producer] and not g.has_users(a)
    assert_use_lists_right(g)
