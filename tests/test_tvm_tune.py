"""MetaSchedule tuning on request: a few trials on one small linear graph, a persisted JSON database
reused across builds, and the database shipped in the bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")

import nnforge  # noqa: E402
from nnforge.backends import tvm as tb  # noqa: E402
from nnforge.backends import tvm_tune  # noqa: E402
from nnforge.errors import NnforgeError  # noqa: E402
from nnforge.ir import Graph, TensorType, interpret  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 32)).astype("float32")


def linear_graph():
    g = Graph("tune_linear")
    x = g.add_input("x", TensorType.of(X))
    w = g.add_constant(RNG.standard_normal((24, 32)).astype("float32"), "w")
    b = g.add_constant(RNG.standard_normal(24).astype("float32"), "b")
    g.outputs = [g.op("relu", g.op("linear", x, w, b))]
    return g


def records(directory) -> int:
    path = directory / tvm_tune.RECORD_FILE
    return len([ln for ln in path.read_text().splitlines() if ln.strip()]) if path.is_file() else 0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    db = tmp_path_factory.mktemp("tunedb")
    graph = linear_graph()
    stages = []
    art = tb.build(graph, "cpu", {"tune": 8, "tune_db": str(db), "progress": stages.append})
    return graph, db, art, stages


def test_tuned_artifact_matches_and_fills_the_database(tuned):
    graph, db, art, stages = tuned
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-5)
    assert art.meta["tuning"]["trials"] > 0 and art.meta["tuning"]["tuned"] >= 1
    assert (db / tvm_tune.WORKLOAD_FILE).is_file() and records(db) > 0
    assert any("/8 trials" in s for s in stages)  # progress reports trials done / total


def test_second_build_reuses_the_database(tuned):
    graph, db, _, _ = tuned
    before = records(db)
    art = tb.build(graph, "cpu", {"tune": 8, "tune_db": str(db)})
    assert art.meta["tuning"]["trials"] == 0 and art.meta["tuning"]["from_db"] == art.meta["tuning"]["kernels"]
    assert records(db) == before
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-5)


def test_bundle_ships_the_database(tuned, tmp_path):
    graph, _, art, _ = tuned
    compiled = nnforge.compiled.CompiledModel(art)
    compiled.save(tmp_path / "b")
    files = json.loads((tmp_path / "b" / "manifest.json").read_text())["files"]
    assert tvm_tune.WORKLOAD_FILE in files and tvm_tune.RECORD_FILE in files
    assert records(tmp_path / "b") >= 1
    loaded = nnforge.load(tmp_path / "b")
    np.testing.assert_allclose(loaded.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-5)


def test_tune_is_refused_where_it_cannot_run():
    with pytest.raises(NnforgeError, match="tune"):
        nnforge.compile(linear_graph(), [X], backend="onnxrt", tune=4, cache=False)
    with pytest.raises(NnforgeError, match="tune"):
        tb.build(linear_graph(), "cpu", {"tune": -1})
