"""ONNX backend node tests (generated from the installed onnx wheel) through both backends.

A fixed sample (every 8th case by name) runs here, beside ONNX Runtime used directly on the same
cases; `make conformance` runs all 1884. No case may give a wrong answer unless ONNX Runtime itself
gives the same wrong answer on it (then nnforge only passes ORT's result through), and the pass
counts may not drop below the floors (measured; see docs/conformance.md).
"""

import pytest

from nnforge import conformance

# the sample (236 cases) when these floors were set: ONNX Runtime direct 211, nnforge-onnxrt 206, nnforge-tvm 201
FLOORS = {"onnxrt": 204, "tvm": 198}


@pytest.fixture(scope="module")
def sample():
    names = conformance.sample([c.name for c in conformance.cases()])
    return names, {r.name: r for r in conformance.run("ort", names, progress=False)}


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
def test_node_tests_sample(sample, backend):
    names, ort = sample
    results = conformance.run(backend, names, progress=False)
    assert len(results) == len(names)
    wrong = [f"{r.name}: {r.detail}" for r in results if r.status == "wrong" and ort[r.name].status != "wrong"]
    crashed = [f"{r.name}: {r.status} {r.detail}" for r in results if r.status in ("crash", "error")]
    assert not wrong, "wrong answers ONNX Runtime does not give:\n" + "\n".join(wrong)
    assert not crashed, "crashes instead of clear errors:\n" + "\n".join(crashed)
    passed = sum(r.status == "pass" for r in results)
    assert passed >= FLOORS[backend], conformance.summary(results)


def test_compare_catches_each_kind_of_difference():
    """The comparison the counts rest on: shape, dtype, count and value differences are all caught."""
    import ml_dtypes
    import numpy as np

    a = np.array([1.0, np.nan, 3.0], np.float32)
    assert conformance._compare([a], [a.copy()], 1e-3, 1e-7) is None  # NaN equals NaN
    assert "shape" in conformance._compare([a], [a[:2]], 1e-3, 1e-7)
    assert "dtype" in conformance._compare([a], [a.astype(np.float64)], 1e-3, 1e-7)
    assert "outputs" in conformance._compare([a], [a, a], 1e-3, 1e-7)
    assert "differ" in conformance._compare([a], [a + 1], 1e-3, 1e-7)
    b = a.astype(ml_dtypes.bfloat16)
    assert conformance._compare([b], [b.copy()], 1e-3, 1e-7) is None
    assert "differ" in conformance._compare([b], [(a + 1).astype(ml_dtypes.bfloat16)], 1e-3, 1e-7)
    i4 = np.array([1, -2], ml_dtypes.int4)
    assert "differ" in conformance._compare([i4], [np.array([1, 2], ml_dtypes.int4)], 1e-3, 1e-7)


@pytest.mark.parametrize(
    "backend, names",
    [("onnxrt", ["model_inception_v1", "model_squeezenet"]), ("tvm", ["model_squeezenet"])],
)
def test_model_zoo_cnns_from_the_onnx_wheel(backend, names):
    """Opset-9 model-zoo CNNs (converted on import; LRN and Dropout's mask on the way) match ONNX Runtime.
    `make conformance` runs all nine on both backends, VGG-19's 102M-element weight included."""
    results = conformance.run(backend, names, progress=False)
    assert [(r.name, r.status) for r in results] == [(n, "pass") for n in sorted(names)], results
