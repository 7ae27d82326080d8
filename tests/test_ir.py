"""The IR: types and symbolic shapes, the registry's references (checked against torch), printer,
verifier, interpreter input checks, serialization (and hostile files), networkx analyses."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnforge.errors import ModelLoadError, VerificationError
from nnforge.ir import Graph, TensorType, analysis, interpret, load_graph, save_graph, symbols, verify
from nnforge.ir.printer import format_graph
from nnforge.ir.registry import REGISTRY, OpError, infer_types

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def small_graph():
    g = Graph("small")
    x = g.add_input("x", TensorType(("batch", "seq", 8)))
    w = g.add_constant(randn(16, 8), "w")
    b = g.add_constant(randn(16), "b")
    h = g.op("gelu", g.op("linear", x, w, b), approximate="tanh")
    heads = g.op("permute", g.op("reshape", h, shape=["batch", "seq", 4, 4]), perm=[0, 2, 1, 3])
    att = g.op("sdpa", heads, heads, heads, is_causal=True)
    g.outputs = [g.op("reshape", g.op("permute", att, perm=[0, 2, 1, 3]), shape=["batch", "seq", 16])]
    return g


def test_symbolic_shape_inference():
    g = small_graph()
    assert g.outputs[0].shape == ("batch", "seq", 16)
    flat = g.op("reshape", g.outputs[0], shape=[-1, 16])
    assert flat.shape == ("batch*seq", 16)
    half = g.op("reshape", g.outputs[0], shape=["batch", -1, 8])
    assert half.shape == ("batch", "2*seq", 8)
    assert symbols.dims_equal(half.shape[1], "seq*2")
    assert g.op("slice", flat, axis=0, start=1).shape[0] == "batch*seq - 1"
    assert g.op("concat", flat, flat, axis=0).shape == ("2*batch*seq", 16)


def test_specialize_fixes_a_symbol_in_types_and_shape_attributes():
    from nnforge.ir.shapes import specialize

    g = Graph()
    x = g.add_input("x", TensorType(("batch", "seq", 8)))
    y = g.op("reshape", g.op("relu", x), shape=("batch", "seq", 2, 4))
    g.outputs = [g.op("reshape", y, shape=("batch * seq", 8))]
    one = specialize(g, {"seq": 1})
    assert one.inputs[0].shape == ("batch", 1, 8) and g.inputs[0].shape == ("batch", "seq", 8)  # a copy
    assert [n.output.shape for n in one.nodes] == [("batch", 1, 8), ("batch", 1, 2, 4), ("batch", 8)]
    verify(one)
    xs = np.random.default_rng(0).standard_normal((3, 1, 8)).astype(np.float32)
    np.testing.assert_array_equal(interpret(one, [xs])[0], interpret(g, [xs])[0])


def test_broadcast_and_type_errors_name_the_op():
    ta, tb = TensorType((2, 3)), TensorType((4, 3))
    with pytest.raises(OpError, match="add"):
        infer_types("add", [ta, tb], {})
    with pytest.raises(OpError, match="dtypes differ"):
        infer_types("add", [ta, TensorType((2, 3), "int64")], {})
    with pytest.raises(OpError, match="matmul: inner dimensions"):
        infer_types("matmul", [TensorType((2, 3)), TensorType((4, 5))], {})
    with pytest.raises(OpError, match="unknown attribute"):
        infer_types("softmax", [ta], {"dim": 1})
    assert infer_types("add", [TensorType(("b", 1, 3)), TensorType((5, 1))], {})[0].shape == ("b", 5, 3)


# Each case: IR op, attrs, numpy inputs, the torch function that is the ground truth.
TORCH_CASES = [
    (
        "conv2d",
        {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 2], "groups": 2},
        [randn(2, 4, 9, 9), randn(6, 2, 3, 3), randn(6)],
        lambda x, w, b: F.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), 2),
    ),
    (
        "max_pool2d",
        {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True},
        [randn(1, 2, 8, 8)],
        lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    ),
    (
        "avg_pool2d",
        {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True, "count_include_pad": True},
        [randn(1, 2, 8, 8)],
        lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True),
    ),
    (
        "avg_pool2d",
        {"kernel": [2, 2], "stride": [2, 2], "padding": [1, 1], "count_include_pad": False},
        [randn(1, 2, 7, 7)],
        lambda x: F.avg_pool2d(x, 2, 2, 1, count_include_pad=False),
    ),
    ("adaptive_avg_pool2d", {"output_size": [3, 2]}, [randn(2, 3, 7, 5)], lambda x: F.adaptive_avg_pool2d(x, (3, 2))),
    (
        "layer_norm",
        {"naxes": 2, "eps": 1e-5},
        [randn(2, 3, 4, 5), randn(4, 5), randn(4, 5)],
        lambda x, w, b: F.layer_norm(x, (4, 5), w, b, 1e-5),
    ),
    (
        "batch_norm",
        {"eps": 1e-3},
        [randn(2, 3, 4, 4), randn(3), np.abs(randn(3)) + 0.5, randn(3), randn(3)],
        lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, False, 0.0, 1e-3),
    ),
    (
        "sdpa",
        {"is_causal": True},
        [randn(2, 3, 5, 4), randn(2, 3, 5, 4), randn(2, 3, 5, 6)],
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    ),
    (
        "sdpa",
        {"scale": 0.3},
        [randn(2, 3, 5, 4), randn(2, 3, 7, 4), randn(2, 3, 7, 4), rng.random((2, 1, 5, 7)) > 0.3],
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
    ),
    ("gelu", {"approximate": "none"}, [randn(4, 5)], lambda x: F.gelu(x)),
    ("gelu", {"approximate": "tanh"}, [randn(4, 5)], lambda x: F.gelu(x, approximate="tanh")),
    ("softmax", {"axis": 1}, [randn(3, 4, 5)], lambda x: torch.softmax(x, 1)),
    ("log_softmax", {"axis": -1}, [randn(3, 4)], lambda x: torch.log_softmax(x, -1)),
    ("rms_norm", {"naxes": 1, "eps": 1e-6}, [randn(3, 8), randn(8)], lambda x, w: F.rms_norm(x, (8,), w, 1e-6)),
    ("silu", {}, [randn(3, 8)], F.silu),
    ("linear", {}, [randn(2, 3, 8), randn(5, 8), randn(5)], F.linear),
    ("gather", {"axis": 0}, [randn(10, 4), rng.integers(0, 10, (2, 3))], lambda w, i: F.embedding(i, w)),
]


@pytest.mark.parametrize("op,attrs,inputs,truth", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_reference_matches_torch(op, attrs, inputs, truth):
    g = Graph()
    vals = [g.add_input(f"i{k}", TensorType.of(a)) for k, a in enumerate(inputs)]
    g.outputs = [g.op(op, *vals, **attrs)]
    got = interpret(g, inputs)[0]
    want = truth(*[torch.from_numpy(a) for a in inputs]).numpy()
    assert got.shape == want.shape == tuple(g.outputs[0].shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_every_op_has_reference_and_inference():
    for name, opdef in REGISTRY.items():
        assert callable(opdef.ref) and callable(opdef.infer), name


def test_printer_one_line_per_node():
    g = small_graph()
    text = format_graph(g)
    lines = text.splitlines()
    assert len(lines) == len(g.nodes) + 3
    assert '%gelu = gelu(%linear) {approximate="tanh"} : f32[batch,seq,16]' in text
    assert "linear(%x, @w, @b)" in text


def test_interpreter_runs_dynamic_sizes_and_checks_inputs():
    g = small_graph()
    for shape in [(2, 5, 8), (1, 9, 8)]:
        out = interpret(g, [randn(*shape)])[0]
        assert out.shape == shape[:2] + (16,)
    with pytest.raises(ValueError, match="input 'x'.*dtype float32"):
        interpret(g, [np.zeros((2, 5, 8), np.int64)])
    with pytest.raises(ValueError, match="input 'x'.*rank 3"):
        interpret(g, [randn(2, 8)])
    with pytest.raises(ValueError, match="input 'x'.*shape"):
        interpret(g, [randn(2, 5, 7)])


def test_verifier_catches_broken_graphs():
    g = small_graph()
    verify(g)
    bad = g.copy()
    bad.nodes[0], bad.nodes[1] = bad.nodes[1], bad.nodes[0]  # use before definition
    with pytest.raises(VerificationError, match="used before it is defined"):
        verify(bad)
    bad = g.copy()
    bad.nodes[1].outputs[0].type = TensorType(("batch", "seq", 99))
    with pytest.raises(VerificationError, match="inference gives"):
        verify(bad)
    bad = g.copy()
    bad.nodes[1].attrs["approximate"] = 3
    with pytest.raises(VerificationError, match="approximate"):
        verify(bad)


def test_serialize_round_trip(tmp_path):
    g = small_graph()
    save_graph(g, tmp_path)
    g2 = load_graph(tmp_path)
    x = randn(2, 4, 8)
    np.testing.assert_array_equal(interpret(g, [x])[0], interpret(g2, [x])[0])
    assert format_graph(g) == format_graph(g2)
    assert not list(tmp_path.glob("*.pkl"))


def test_hostile_graph_files_are_refused_without_running_code(tmp_path):
    g = small_graph()
    save_graph(g, tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    marker = tmp_path / "pwned"
    evil = dict(doc)
    evil["inputs"] = [dict(doc["inputs"][0], shape=[f"__import__('os').system('touch {marker}')", "seq", 8])]
    (tmp_path / "graph.json").write_text(json.dumps(evil))
    with pytest.raises(ModelLoadError):
        load_graph(tmp_path)
    assert not marker.exists()
    for mutate, msg in [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["nodes"][1].update(op="no_such_op"), "unknown op"),
        (lambda d: d["nodes"][0].update(inputs=["nope", "w", "b"]), "not defined"),
        (lambda d: d["constants"][0].update(shape=[3, 3]), "weights file holds"),
    ]:
        d = json.loads(json.dumps(doc))
        mutate(d)
        (tmp_path / "graph.json").write_text(json.dumps(d))
        with pytest.raises(ModelLoadError, match=msg):
            load_graph(tmp_path)
    (tmp_path / "graph.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_graph(tmp_path)


def test_analysis_cycles_and_dominators():
    g = Graph()
    x = g.add_input("x", TensorType((4,)))
    a = g.op("exp", x)
    b = g.op("neg", a)
    c = g.op("add", a, b)
    g.outputs = [c]
    na, nb, nc = g.nodes
    # fusing a and c while b sits between them (a -> b -> c) would make a cycle; a+b or b+c is fine
    assert analysis.fusion_creates_cycle(g, [na, nc])
    assert not analysis.fusion_creates_cycle(g, [na, nb])
    assert analysis.reachable(g, na, nc) and not analysis.reachable(g, nc, na)
    assert analysis.immediate_dominators(g)[nc] is na
    g.nodes = [nc, na, nb]
    g.toposort()
    assert g.nodes == [na, nb, nc]
