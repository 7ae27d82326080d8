"""ONNX frontend: the zoo families exported by torch.onnx (dynamo) import and match eager; bad files are refused."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nnforge.backends.onnxrt import OnnxRuntimeBackend
from nnforge.errors import ModelLoadError, UnsupportedOpError
from nnforge.frontend.onnx import import_onnx
from nnforge.ir import interpret, verify
from nnforge.models import zoo
from nnforge.targets import get_target


def _export(zm: zoo.ZooModel, path, dynamic: bool = True) -> str:
    torch.onnx.export(
        zm.model,
        zm.inputs,
        str(path),
        dynamo=True,
        input_names=list(zm.input_names),
        dynamic_shapes=zm.dynamic_shapes if dynamic else None,
        verbose=False,
    )
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (ZooModel, path of its dynamo export with the zoo's dynamic shapes); exported once per module."""
    folder = tmp_path_factory.mktemp("onnx_zoo")
    cache = {}

    def get(family):
        if family not in cache:
            zm = zoo.build(family, "tiny")
            cache[family] = zm, _export(zm, folder / f"{family}.onnx")
        return cache[family]

    return get


def _other_inputs(zm: zoo.ZooModel) -> tuple:
    """Inputs at another batch (and sequence) size than the export's."""
    gen = torch.Generator().manual_seed(7)
    if zm.family in ("mlp", "cnn", "vit"):
        x = zm.inputs[0]
        return (torch.randn((3,) + tuple(x.shape[1:]), generator=gen),)
    ids = torch.randint(0, 100, (3, 11), generator=gen)
    if zm.family == "gpt":
        return (ids,)
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[0, 7:] = 0
    return ids, mask


def _close(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-4 * max(1.0, float(np.max(np.abs(want)))), f"max abs error {err}"


def _eager(zm, inputs) -> np.ndarray:
    with torch.no_grad():
        return zm.model(*inputs).numpy()


@pytest.mark.filterwarnings("ignore:# The axis name")  # torch.onnx notes that bert's two inputs share Dims
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_zoo_family_imports_and_matches_eager(family, exported):
    zm, path = exported(family)
    g = import_onnx(path)
    verify(g)
    want_dims = {
        "mlp": ["batch"],
        "cnn": ["batch"],
        "vit": ["batch"],
        "bert": ["batch", "seq"],
        "gpt": ["batch", "seq"],
    }
    assert g.symbols() == want_dims[family]
    assert [v.name for v in g.inputs] == list(zm.input_names)
    for inputs in (zm.inputs, _other_inputs(zm)):
        feeds = [t.numpy() for t in inputs]
        _close(interpret(g, feeds)[0], _eager(zm, inputs))
    # and the imported graph builds and runs on ONNX Runtime (one session, both sizes)
    art = OnnxRuntimeBackend().build(g, get_target("cpu"))
    for inputs in (zm.inputs, _other_inputs(zm)):
        _close(art.run([t.numpy() for t in inputs])[0], _eager(zm, inputs))


def test_static_export_folds_shape_math(tmp_path):
    zm = zoo.build("gpt", "tiny")
    g = import_onnx(_export(zm, tmp_path / "gpt_static.onnx", dynamic=False))
    assert g.symbols() == [] and all(v.type.is_static for v in g.all_values())
    # the causal mask (Shape -> Expand -> Trilu -> Where) is a constant now
    assert "arange" not in g.op_counts() and "where" not in g.op_counts()
    _close(interpret(g, [zm.inputs[0].numpy()])[0], _eager(zm, zm.inputs))


def test_bytes_and_modelproto_sources(exported):
    zm, path = exported("mlp")
    model = onnx.load(path)  # torch writes the weights as external data; this pulls them in
    feeds = [zm.inputs[0].numpy()]
    want = interpret(import_onnx(path), feeds)[0]
    for src in (model.SerializeToString(), model):
        np.testing.assert_array_equal(interpret(import_onnx(src), feeds)[0], want)


# ---------------------------------------------------------------------------------------
# hand-built models
# ---------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits=(), opset=20, **kw) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "m", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9, **kw)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _relu_model(weights: np.ndarray | None = None) -> onnx.ModelProto:
    w = numpy_helper.from_array(weights if weights is not None else np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        [_vi("x", ["n", 3])],
        [_vi("z", ["n", 4])],
        [w],
    )


def test_dynamic_reshape_from_shape_math():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape with a dim_param turns into a symbolic reshape."""
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Mul", ["n", "two"], ["n2"]),
        helper.make_node("Unsqueeze", ["n2", "axes0"], ["n2v"]),
        helper.make_node("Concat", ["n2v", "three"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape"),
    ]
    m = _model(
        nodes,
        [_vi("x", ["rows", 6])],
        [_vi("y", [None, 3])],
        [c("zero", 0), c("two", 2), c("axes0", [0]), c("three", [3])],
    )
    g = import_onnx(m)
    assert g.op_counts() == {"reshape": 1}
    assert g.outputs[0].shape == ("2*rows", 3)
    x = np.arange(30, dtype=np.float32).reshape(5, 6)
    np.testing.assert_array_equal(interpret(g, [x])[0], x.reshape(10, 3))


def test_less_common_ops_match_onnxruntime():
    """Ops the zoo exports do not use, checked against ONNX Runtime running the same file."""
    import onnxruntime as ort

    c = lambda name, v, dt=np.int64: numpy_helper.from_array(np.asarray(v, dt), name)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Sum", ["f", "f", "two"], ["s"]),
        helper.make_node("Dropout", ["s"], ["d"]),
        helper.make_node("Shape", ["f"], ["fs"]),
        helper.make_node(
            "ConstantOfShape", ["fs"], ["ones"], value=numpy_helper.from_array(np.array([1.5], np.float32))
        ),
        helper.make_node("Add", ["d", "ones"], ["y0"]),
        helper.make_node("GlobalMaxPool", ["x"], ["y1"]),
        helper.make_node("Split", ["f", "sizes"], ["y2", "y3"], axis=1),
        helper.make_node("Range", ["zero", "five", "one"], ["r"]),
        helper.make_node("CastLike", ["r", "f"], ["y4"]),
        helper.make_node("Size", ["f"], ["size"]),  # shape math on the symbol: 32 n -> [2 n, 16]
        helper.make_node("Div", ["size", "sixteen"], ["rows"]),
        helper.make_node("Concat", ["rows", "sixteen"], ["shape"], axis=0),
        helper.make_node("Reshape", ["f", "shape"], ["y5"]),
        helper.make_node("Mod", ["r", "three"], ["y7"]),
        helper.make_node("ReduceMax", ["x"], ["y6"], keepdims=0, axes=[1, 3]),
    ]
    m = _model(
        nodes,
        [_vi("x", ["n", 2, 4, 4])],
        [
            _vi("y0", ["n", 32]),
            _vi("y1", ["n", 2, 1, 1]),
            _vi("y2", ["n", 10]),
            _vi("y3", ["n", 22]),
            _vi("y4", [5]),
            _vi("y5", [None, 16]),
            _vi("y6", ["n", 4]),
            _vi("y7", [5], TensorProto.INT64),
        ],
        [c("sizes", [10, 22]), c("zero", 0), c("five", 5), c("one", 1), c("three", 3), c("sixteen", [16])],
        opset=17,
    )
    g = import_onnx(m)
    assert g.outputs[5].shape == ("2*n", 16)
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (2, 3):
        x = np.random.default_rng(n).standard_normal((n, 2, 4, 4)).astype(np.float32)
        for got, want in zip(interpret(g, [x]), session.run(None, {"x": x})):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_symbolic_shapes_used_as_data_are_computed_at_run_time():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "sf"], ["y"], name="scale_by_shape"),
    ]
    model = _model(nodes, [_vi("x", ["n", 2])], [_vi("y", ["n", 2]), _vi("s", [2], TensorProto.INT64)])
    g = import_onnx(model)
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 2)).astype(np.float32)
        y, s = interpret(g, [x])
        np.testing.assert_array_equal(s, [n, 2])
        np.testing.assert_allclose(y, x * np.array([n, 2], np.float32), rtol=1e-6)


def test_unnamed_dynamic_dim_gets_a_symbol():
    m = _relu_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    g = import_onnx(m)
    assert isinstance(g.inputs[0].shape[0], str)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(
        interpret(g, [x])[0], np.maximum(x @ np.arange(12, dtype=np.float32).reshape(3, 4), 0)
    )


def test_values_ir_types_cannot_hold_are_refused_at_the_boundary():
    """A sequence as a graph output cannot leave the kept region: refused, naming the ops."""
    nodes = [helper.make_node("SplitToSequence", ["x"], ["seq"], name="to_seq")]
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)
    with pytest.raises(UnsupportedOpError, match="SplitToSequence.*not a tensor"):
        import_onnx(_model(nodes, [_vi("x", [4, 3])], [seq]))


def test_attribute_combinations_the_ir_lacks_are_kept_as_is():
    w = numpy_helper.from_array(np.ones((2, 3, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="padded_conv", pads=[0, 0, 1, 1])
    model = _model([conv], [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 2, 7, 7])], [w])
    g = import_onnx(model)
    assert [n.op for n in g.nodes] == ["onnx_node"] and "padded_conv" in g.nodes[0].source
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(interpret(g, [x])[0], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------


def _load_error(src, *needles):
    with pytest.raises(ModelLoadError) as e:
        import_onnx(src)
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_empty_truncated_and_garbage_files(tmp_path):
    good = _relu_model(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)).SerializeToString()
    _load_error(tmp_path / "nope.onnx", "nope.onnx", "no such file")
    (tmp_path / "empty.onnx").write_bytes(b"")
    _load_error(tmp_path / "empty.onnx", "empty.onnx", "empty")
    for cut in (len(good) // 2, len(good) - 3, 7):
        (tmp_path / "cut.onnx").write_bytes(good[:cut])
        _load_error(tmp_path / "cut.onnx", "cut.onnx")
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    _load_error(tmp_path / "junk.onnx", "junk.onnx")
    (tmp_path / "text.onnx").write_bytes(b"this is not an onnx model\n" * 10)
    _load_error(tmp_path / "text.onnx", "text.onnx")
    _load_error(tmp_path, "directory")
    _load_error(b"\x08\x07garbage", "<bytes>")


def test_invalid_models_are_refused():
    undefined = _model([helper.make_node("Relu", ["ghost"], ["y"])], [_vi("x", [2])], [_vi("y", [2])])
    _load_error(undefined, "onnx.checker")
    bad_shapes = _model(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], [_vi("a", [2, 3]), _vi("b", [4, 5])], [_vi("y", [2, 5])]
    )
    _load_error(bad_shapes, "shape inference")
    foreign = _model(
        [helper.make_node("FusedThing", ["x"], ["y"], domain="com.example", name="f1")],
        [_vi("x", [2])],
        [_vi("y", [2])],
    )
    foreign.opset_import.append(helper.make_opsetid("com.example", 1))
    _load_error(foreign, "com.example", "FusedThing")


def _save_external(tmp_path, location: str) -> str:
    """A valid model whose weight lives in external data, then its location rewritten to ``location``."""
    model = _relu_model()
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    path = str(folder / "model.onnx")
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0
    )
    m = onnx.load(path, load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    onnx.save_model(m, path)
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    g = import_onnx(_save_external(tmp_path, "weights.bin"))
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(
        interpret(g, [x])[0], np.maximum(x @ np.arange(12, dtype=np.float32).reshape(3, 4), 0)
    )


@pytest.mark.parametrize(
    "location,needle",
    [
        ("../weights.bin", "'..'"),
        ("sub/../../weights.bin", "'..'"),
        ("/etc/passwd", "absolute"),
        ("missing.bin", "missing"),
    ],
)
def test_external_data_outside_the_folder_is_refused(tmp_path, location, needle):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 48)  # a real file the escape would reach
    path = _save_external(tmp_path, location)
    msg = _load_error(path, needle, "model.onnx")
    assert "Traceback" not in msg


def test_external_data_through_a_symlink_is_refused(tmp_path):
    path = _save_external(tmp_path, "weights.bin")
    outside = tmp_path / "outside.bin"
    os.replace(os.path.join(os.path.dirname(path), "weights.bin"), outside)
    os.symlink(outside, os.path.join(os.path.dirname(path), "weights.bin"))
    _load_error(path, "outside the model's folder")


def test_external_data_without_a_path_is_refused(tmp_path):
    path = _save_external(tmp_path, "weights.bin")
    _load_error(onnx.load(path, load_external_data=False), "file path")


# ---------------------------------------------------------------------------------------
# more hostile files: cycles, newer opsets, inconsistent declarations, huge declared tensors
# ---------------------------------------------------------------------------------------


def test_cyclic_graphs_are_refused():
    cycle = _model(
        [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
        [_vi("x", [2])],
        [_vi("b", [2])],
    )
    _load_error(cycle, "topologically sorted")
    _load_error(
        _model([helper.make_node("Add", ["x", "a"], ["a"])], [_vi("x", [2])], [_vi("a", [2])]), "topologically sorted"
    )


def test_newer_opset_and_inconsistent_declarations_are_refused():
    _load_error(
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=99), "opset 99"
    )
    _load_error(
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [3])]),
        "shape inference",
        "(2) vs (3)",
    )
    _load_error(
        _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [-5])], [_vi("y", [-5])]), "negative size -5"
    )


def test_huge_declared_tensors_are_refused_before_allocating():
    """A few hundred bytes must not make the importer allocate gigabytes (or crash on MemoryError)."""
    huge = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    _load_error(
        _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", [1])], [_vi("y", [1 << 20, 1 << 20])], [huge]),
        "too small for the declared shape",
    )
    shape = numpy_helper.from_array(np.array([100000, 100000], np.int64), "s")
    big = [_vi("y", [100000, 100000])]
    _load_error(
        _model(
            [
                helper.make_node("ConstantOfShape", ["s"], ["c"], name="fill"),
                helper.make_node("Add", ["x", "c"], ["y"]),
            ],
            [_vi("x", [1])],
            big,
            [shape],
        ),
        "fill",
        "10,000,000,000 elements",
    )
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    _load_error(
        _model(
            [helper.make_node("Expand", ["one", "s"], ["c"], name="grow"), helper.make_node("Add", ["x", "c"], ["y"])],
            [_vi("x", [1])],
            big,
            [shape, one],
        ),
        "grow",
        "elements",
    )
    ends = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("a", 0), ("b", 10**10), ("d", 1))]
    _load_error(
        _model(
            [helper.make_node("Range", ["a", "b", "d"], ["y"], name="count")],
            [_vi("x", [1])],
            [_vi("y", [10**10], TensorProto.INT64)],
            ends,
        ),
        "count",
        "elements",
    )
    _load_error(
        _model(
            [helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1 << 40, 1 << 40])], [_vi("y", [1 << 40, 1 << 40])]
        ),
        "declares",
        "elements",
    )
