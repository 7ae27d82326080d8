"""ONNX models nobody here wrote: ops kept as is for ONNX Runtime, old opsets, every dtype ORT takes, and the
wrong answers the conformance run found, each pinned by a regression test through the differential check
(ONNX Runtime on the file as is vs the interpreter vs each backend)."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnforge
from nnforge.backends.onnxrt import run_onnx_directly
from nnforge.errors import NnforgeError
from nnforge.frontend.onnx import import_onnx
from nnforge.ir import interpret
from nnforge.ir.serialize import graph_from_json, graph_to_json


def _model(nodes, inputs, outputs, inits=(), opset=20):
    g = helper.make_graph(nodes, "m", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _agree(model, inputs, backends=("onnxrt", "tvm"), tol=1e-5):
    """ORT on the file, the interpreter and every backend give the same outputs (shapes and dtypes too)."""
    want = run_onnx_directly(model, inputs)
    graph = import_onnx(model)
    got = {"interpreter": interpret(graph, inputs)}
    for b in backends:
        got[b] = nnforge.compile(model, inputs, backend=b, cache=False, progress=False).run(inputs)
    for who, outs in got.items():
        assert len(outs) == len(want), who
        for o, w in zip(outs, want):
            assert o.shape == w.shape and o.dtype == w.dtype, (who, o.shape, w.shape, o.dtype, w.dtype)
            if w.dtype.kind in "OUS":
                np.testing.assert_array_equal(o, w, err_msg=who)
            else:
                np.testing.assert_allclose(o.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol, err_msg=who)
    return graph


def test_ops_without_an_ir_op_are_kept_for_onnx_runtime():
    nodes = [
        helper.make_node("Hardmax", ["x"], ["a"], axis=1),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Det", ["b"], ["d"]),
        helper.make_node("Add", ["x", "x"], ["e"]),
        helper.make_node("Mul", ["e", "e"], ["f"]),
        helper.make_node("Sub", ["f", "x"], ["y"]),
    ]
    m = _model(nodes, [_vi("x", [3, 3])], [_vi("d", []), _vi("y", [3, 3])])
    x = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    g = _agree(m, [x])
    kept = [n for n in g.nodes if n.op == "onnx_node"]
    assert [n.attrs["op_type"] for n in kept] == ["Hardmax", "Det"]
    # on TVM the kept nodes run in ONNX Runtime partitions, the rest on TVM
    fast = nnforge.compile(m, [x], backend="tvm", cache=False, progress=False, min_block_size=1)
    assert fast.artifact.backend == "tvm+onnxrt"
    assert {p.backend for p in fast.artifact.plan.partitions} == {"tvm", "onnxrt"}


def test_kept_nodes_survive_the_bundle_and_graph_json(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Hardmax", ["a"], ["b"]),
             helper.make_node("Exp", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["d"]),
             helper.make_node("Abs", ["d"], ["y"])]  # fmt: skip
    m = _model(nodes, [_vi("x", [2, 5])], [_vi("y", [2, 5])])
    x = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    fast = nnforge.compile(m, [x], backend="tvm", cache=False, progress=False)
    fast.save(tmp_path / "b")
    again = nnforge.load(tmp_path / "b")
    np.testing.assert_allclose(again(x), fast(x), rtol=1e-6)
    g = import_onnx(m)
    g = graph_from_json(graph_to_json(g), dict(g.constants))
    np.testing.assert_allclose(interpret(g, [x])[0], run_onnx_directly(m, [x])[0], rtol=1e-6)


def test_a_hostile_kept_node_payload_is_refused():
    g = import_onnx(_model([helper.make_node("Hardmax", ["x"], ["y"])], [_vi("x", [2, 2])], [_vi("y", [2, 2])]))
    for payload in ("bm90IGEgbW9kZWw=", "!!not base64!!"):  # base64 of "not a model"; not base64 at all
        doc = graph_to_json(g)
        doc["nodes"][0]["attrs"]["model"] = payload
        with pytest.raises(NnforgeError, match="onnx_node"):
            graph_from_json(doc, {})


def test_sequences_and_subgraphs_stay_in_one_kept_region():
    split = helper.make_node("SplitToSequence", ["x"], ["seq"], axis=0, keepdims=0)
    at = helper.make_node("SequenceAt", ["seq", "one"], ["row"])
    then = helper.make_graph([helper.make_node("Mul", ["row", "w"], ["t"])], "then", [], [_vi("t", [3])])
    other = helper.make_graph([helper.make_node("Neg", ["row"], ["e"])], "else", [], [_vi("e", [3])])
    branch = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    inits = [
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.arange(3, dtype=np.float32), "w"),  # read only inside the If's branch
    ]
    m = _model([split, at, branch], [_vi("x", [4, 3]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [3])], inits)
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    for cond in (True, False):
        g = _agree(m, [x, np.array(cond)])
    # the If reads the sequence element inside its branches, so it joins the region
    assert [n.attrs["op_type"] for n in g.nodes if n.op == "onnx_node"] == ["SplitToSequence+SequenceAt+If"]


def test_old_opsets_are_converted():
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Unsqueeze", ["a"], ["b"], axes=[0]),  # axes an attribute before opset 13
        helper.make_node("ReduceSum", ["b"], ["y"], axes=[2], keepdims=0),
    ]
    m = _model(nodes, [_vi("x", [2, 4])], [_vi("y", [1, 2])], [w], opset=9)
    _agree(m, [np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)])


@pytest.mark.parametrize(
    "dtype, values",
    [
        (TensorProto.UINT16, np.array([1, 65535, 7], np.uint16)),
        (TensorProto.UINT64, np.array([1, 2**63, 7], np.uint64)),
        (TensorProto.BFLOAT16, np.array([1.5, -2, np.nan], ml_dtypes.bfloat16)),
        (TensorProto.FLOAT8E4M3FN, np.array([1.5, -2, 0.25], ml_dtypes.float8_e4m3fn)),
        (TensorProto.STRING, np.array(["a", "bc", ""], object)),
    ],
)
def test_every_dtype_onnx_runtime_takes_crosses_the_boundary(dtype, values):
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["x"], ["z"])]
    m = _model(nodes, [_vi("x", [3], dtype)], [_vi("y", [3], dtype), _vi("z", [3], dtype)], opset=21)
    y, z = nnforge.compile(m, [values], backend="onnxrt", cache=False, progress=False).run([values])
    assert y.dtype == values.dtype
    np.testing.assert_array_equal(
        y.astype(object) if dtype == TensorProto.STRING else y.view(np.uint8 if y.itemsize == 1 else y.dtype),
        values.astype(object) if dtype == TensorProto.STRING else values.view(np.uint8 if y.itemsize == 1 else y.dtype),
    )


# ---------------------------------------------------------------------------------------
# the wrong answers the conformance run found, each caught by the differential check
# ---------------------------------------------------------------------------------------


def _check_ok(model, inputs):
    report = nnforge.check(model, inputs, backends=("onnxrt", "tvm"))
    assert report.reference == "onnxruntime (the file as is)"
    assert report.ok, str(report)


@pytest.mark.parametrize("axis", [-1, -2, -3, -4, 0, 4])
def test_flatten_negative_axis_counts_from_the_end(axis):
    m = _model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], [_vi("x", [2, 3, 4, 5])], [_vi("y", None)])
    m = onnx.shape_inference.infer_shapes(m)
    _check_ok(m, [np.random.default_rng(5).standard_normal((2, 3, 4, 5)).astype(np.float32)])


@pytest.mark.parametrize("dtype", [TensorProto.INT32, TensorProto.INT64])
def test_integer_div_truncates_toward_zero(dtype):
    np_dt = helper.tensor_dtype_to_np_dtype(dtype)
    m = _model([helper.make_node("Div", ["a", "b"], ["y"])], [_vi("a", [6], dtype), _vi("b", [6], dtype)],
               [_vi("y", [6], dtype)])  # fmt: skip
    a, b = np.array([7, -7, 7, -7, 6, -1], np_dt), np.array([2, 2, -2, -2, 3, 5], np_dt)
    _check_ok(m, [a, b])
    np.testing.assert_array_equal(interpret(import_onnx(m), [a, b])[0], [3, -3, -3, 3, 2, 0])


def test_isnan_on_tvm():
    nodes = [helper.make_node("IsNaN", ["x"], ["y"]), helper.make_node("Equal", ["x", "x"], ["z"])]
    m = _model(nodes, [_vi("x", [4])], [_vi("y", [4], TensorProto.BOOL), _vi("z", [4], TensorProto.BOOL)])
    _check_ok(m, [np.array([1.0, np.nan, np.inf, -0.0], np.float32)])


def test_rank0_inputs_and_outputs():
    nodes = [helper.make_node("Add", ["s", "v"], ["y"]), helper.make_node("Exp", ["s"], ["e"])]
    m = _model(nodes, [_vi("s", []), _vi("v", [3])], [_vi("y", [3]), _vi("e", [])])
    inputs = [np.array(2.0, np.float32), np.ones(3, np.float32)]
    _check_ok(m, inputs)
    for b in ("onnxrt", "tvm"):
        assert nnforge.compile(m, inputs, backend=b, cache=False, progress=False).run(inputs)[1].shape == ()


def test_the_check_names_a_wrong_shape_against_onnx_runtime():
    """The differential check's ONNX Runtime reference catches importer mistakes the interpreter shares."""
    m = _model([helper.make_node("Flatten", ["x"], ["y"], axis=-1)], [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    report = nnforge.check(m, [np.ones((2, 3), np.float32)], backends=("onnxrt",))
    assert report.ok
    with pytest.raises(ValueError, match="expected shape"):
        nnforge.compile(m, [np.ones((2, 3), np.float32)], backend="onnxrt", cache=False, progress=False).run(
            [np.ones((3, 3), np.float32)]
        )


def test_int4_values_are_packed_for_onnx_runtime_and_unpacked_back():
    nodes = [
        helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.INT8),
        helper.make_node("Cast", ["wide"], ["y"], to=TensorProto.INT4),
    ]
    m = _model(nodes, [_vi("x", [5], TensorProto.INT4)], [_vi("wide", [5], TensorProto.INT8),
               _vi("y", [5], TensorProto.INT4)], opset=21)  # fmt: skip
    x = np.array([-8, 7, 3, -1, 0], ml_dtypes.int4)
    wide, y = nnforge.compile(m, [x], backend="onnxrt", cache=False, progress=False).run([x])
    np.testing.assert_array_equal(wide, [-8, 7, 3, -1, 0])
    assert y.dtype == x.dtype and (y.astype(np.int8) == x.astype(np.int8)).all()


def test_fully_masked_rows_on_tvm():
    """ONNX's attention masks a row out by testing max(bias) == -inf; TVM's max started at the lowest finite
    value, so a row of only -inf never compared equal and its softmax NaNs leaked out."""
    nodes = [
        helper.make_node("ReduceMax", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Equal", ["m", "ninf"], ["masked"]),
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("Where", ["masked", "zero", "p"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(-np.inf, np.float32), "ninf"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    m = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], inits)
    x = np.array([[-np.inf] * 3, [0.0, 1.0, -np.inf]], np.float32)
    _check_ok(m, [x])
    y = nnforge.compile(m, [x], backend="tvm", cache=False, progress=False).run([x])[0]
    np.testing.assert_array_equal(y[0], 0.0)


def test_negative_indices_in_gather_and_scatter_elements():
    """TVM's gather_elements read out of bounds on a negative index (garbage, not an error)."""
    nodes = [
        helper.make_node("GatherElements", ["x", "i"], ["g"], axis=1),
        helper.make_node("ScatterElements", ["x", "i", "u"], ["s"], axis=1),
    ]
    m = _model(
        nodes,
        [_vi("x", [2, 3]), _vi("i", [2, 2], TensorProto.INT64), _vi("u", [2, 2])],
        [_vi("g", [2, 2]), _vi("s", [2, 3])],
    )
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    _check_ok(m, [x, np.array([[-1, 0], [-3, 2]], np.int64), np.full((2, 2), 9.0, np.float32)])


def test_explain_shows_kept_nodes_falling_back_to_onnx_runtime():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Hardmax", ["a"], ["b"]),
             helper.make_node("Exp", ["b"], ["c"]), helper.make_node("Neg", ["c"], ["d"]),
             helper.make_node("Abs", ["d"], ["y"])]  # fmt: skip
    m = _model(nodes, [_vi("x", [2, 5])], [_vi("y", [2, 5])])
    exp = nnforge.explain(m, [np.ones((2, 5), np.float32)], backend="tvm", quiet=True)
    kept = next(r for r in exp.rows if r.op == "onnx_node")
    assert kept.partition.endswith("onnxrt") and kept.verdicts["tvm"] and kept.verdicts["torch"]
    assert [r.op for r in exp.fallback] == ["relu", "onnx_node"]  # relu joins it: a TVM island below min_block_size
    assert "falls back: 2 of 5 node(s) (onnxrt 2)" in str(exp)
