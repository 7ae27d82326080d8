"""MetaSchedule tuning on request: a few trials on one small linear graph, a persisted JSON database
reused across builds, the database shipped in the bundle, and records slower than nnforge's default
schedule left out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import nnforge
from nnforge.backends import tvm as tb
from nnforge.backends import tvm_tune
from nnforge.errors import NnforgeError
from nnforge.ir import Graph, TensorType, interpret

RNG = np.random.default_rng(0)
X = RNG.standard_normal((64, 256)).astype("float32")  # naive loops: ~10x the default schedule; outputs ~10-50


def linear_graph():
    g = Graph("tune_linear")
    x = g.add_input("x", TensorType.of(X))
    w = g.add_constant(RNG.standard_normal((384, 256)).astype("float32"), "w")
    b = g.add_constant(RNG.standard_normal(384).astype("float32"), "b")
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
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-3)
    assert art.meta["tuning"]["trials"] > 0 and art.meta["tuning"]["tuned"] >= 1
    assert (db / tvm_tune.WORKLOAD_FILE).is_file() and records(db) > 0
    assert any("/8 trials" in s for s in stages)  # progress reports trials done / total
    verdicts = tvm_tune.load_verdicts(db)  # every record was timed against the default schedule
    assert verdicts and all(
        v["default_us"] > 0 and v["keep"] == (v["tuned_us"] < v["default_us"]) for v in verdicts.values()
    )
    assert art.meta["tuning"]["kept"] + art.meta["tuning"]["dropped"] == len(verdicts)
    assert records(db) >= 1


def test_a_record_slower_than_the_default_schedule_is_not_applied(tuned, tmp_path):
    """Make the matmul kernel's best record the naive loops, claiming to run in 1 ns:
    timed against the default schedule it loses, so it is neither applied nor shipped."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    graph, db, _, _ = tuned
    db = shutil.copytree(db, tmp_path / "db")
    full = tvm_tune.open_db(db)
    rec = next(r for r in full.get_all_tuning_records() if "matmul" in r.workload.mod.script())
    naive = Schedule(rec.workload.mod)
    naive.get_sblock("T_add")  # a one-step trace (get_top_k skips empty ones) that leaves the loops naive
    full.commit_tuning_record(ms.database.TuningRecord(naive.trace, rec.workload, [1e-9], rec.target, rec.args_info))
    art = tb.build(graph, "cpu", {"tune": 8, "tune_db": str(db)})
    assert art.meta["tuning"]["trials"] == 0 and art.meta["tuning"]["dropped"] >= 1
    naive = [v for v in tvm_tune.load_verdicts(db).values() if v["record_us"] == 0.001]
    assert len(naive) == 1 and not naive[0]["keep"] and naive[0]["tuned_us"] > naive[0]["default_us"]
    shipped = art.tuning_files.get(tvm_tune.RECORD_FILE, "")
    assert len([ln for ln in shipped.splitlines() if ln.strip()]) == art.meta["tuning"]["kept"]
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-3)


def test_second_build_reuses_the_database(tuned):
    graph, db, _, _ = tuned
    before = records(db)
    art = tb.build(graph, "cpu", {"tune": 8, "tune_db": str(db)})
    assert art.meta["tuning"]["trials"] == 0 and art.meta["tuning"]["from_db"] == art.meta["tuning"]["kernels"]
    assert records(db) == before
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-3)


def test_bundle_ships_the_database(tuned, tmp_path):
    graph, _, art, _ = tuned
    compiled = nnforge.compiled.CompiledModel(art)
    compiled.save(tmp_path / "b")
    files = json.loads((tmp_path / "b" / "manifest.json").read_text())["files"]
    assert tvm_tune.WORKLOAD_FILE in files and tvm_tune.RECORD_FILE in files
    assert records(tmp_path / "b") == art.meta["tuning"]["kept"]  # records slower than the default are left out
    loaded = nnforge.load(tmp_path / "b")
    np.testing.assert_allclose(loaded.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-3)


def test_kernels_metaschedule_cannot_search_keep_the_default_schedule(tmp_path, monkeypatch):
    """A kernel whose design space MetaSchedule fails to generate (GPT's causal-mask kernel) is left out of
    tuning instead of failing it."""
    monkeypatch.setattr(tvm_tune, "_has_space", lambda context: False)
    graph = linear_graph()
    art = tb.build(graph, "cpu", {"tune": 8, "tune_db": str(tmp_path)})
    assert art.meta["tuning"]["untunable"] == art.meta["tuning"]["kernels"] and art.meta["tuning"]["trials"] == 0
    np.testing.assert_allclose(art.run([X])[0], interpret(graph, [X])[0], rtol=1e-4, atol=1e-3)


def test_tune_is_refused_where_it_cannot_run():
    with pytest.raises(NnforgeError, match="tune"):
        nnforge.compile(linear_graph(), [X], backend="onnxrt", tune=4, cache=False)
    with pytest.raises(NnforgeError, match="tune"):
        tb.build(linear_graph(), "cpu", {"tune": -1})


def test_missing_tune_packages_are_named_with_the_extra_that_installs_them(monkeypatch):
    monkeypatch.setitem(tvm_tune.TUNE_PACKAGES, "nnforge_no_such_module", "no-such-package")
    with pytest.raises(NnforgeError, match=r"needs no-such-package, .*pip install nnforge\[tune\]"):
        tb.build(linear_graph(), "cpu", {"tune": 1})
