"""Searches on Ray: a real local Ray cluster of two workers. The budget search gives every candidate the same
quality figure on Ray as serially; a worker that dies is retried and no item is lost or counted twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from nnforge import scale
from nnforge.errors import NnforgeError
from nnforge.passes.budget import Budget, flop_time, search

SPACE = dict(merge_r=[0, 4, 8], prune_keep=[1.0, 0.7], skip=[0, 1], quantize=["float"])


@pytest.fixture(scope="module")
def ray_cluster():
    ray = scale.start_local(num_cpus=2, object_store_mb=100)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_a_dying_worker_is_retried_and_nothing_is_lost_or_doubled(ray_cluster, tmp_path):
    def square_dying_once(item: tuple[int, str]) -> int:  # defined here: Ray ships it by value, not by module
        """Item 2's first attempt kills its worker process: only Ray's retry can deliver its result."""
        n, marker = item
        if n == 2 and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return n * n

    marker = str(tmp_path / "died")
    items = [(n, marker) for n in range(6)]
    assert scale.map_items(square_dying_once, items, "squares", progress=True) == [n * n for n in range(6)]
    assert Path(marker).exists()  # the worker did die once
    with pytest.raises(NnforgeError, match="failed on Ray"):  # without retries the death is reported by item
        Path(marker).unlink()
        scale.map_items(square_dying_once, items, "squares", max_retries=0, describe=lambda i: f"item {i[0]}")


def test_an_exception_in_a_task_is_raised_as_itself(ray_cluster):
    with pytest.raises(ZeroDivisionError):
        scale.map_items(lambda n: 1 / n, [1, 0, 2], "inverses", progress=False)


def test_items_a_result_rules_out_are_not_submitted(ray_cluster):
    seen = []  # two CPUs: two tasks in flight, so items 0-3 are submitted before any result can rule out 4-7
    got = scale.map_items(
        lambda n: n * 10,
        list(range(8)),
        "tens",
        skip=lambda k: bool(seen) and k >= 4,
        on_result=lambda k, r: seen.append((k, r)),
    )
    assert got == [0, 10, 20, 30, None, None, None, None]
    assert sorted(seen) == [(0, 0), (1, 10), (2, 20), (3, 30)]


def test_budget_search_on_ray_matches_the_serial_search(ray_cluster, digits_vit):
    d = digits_vit
    cal, held = d.calibration(), d.heldout()
    serial = search(d.graph, Budget(max_drop=0.01, executor="serial", **SPACE), cal, held, flop_time(cal[0]))
    assert scale.wants_ray(None)  # ray.init ran here: the default executor is Ray
    on_ray = search(d.graph, Budget(max_drop=0.01, **SPACE), cal, held, flop_time(cal[0]), progress=True)
    assert [c.setting for c in on_ray.candidates] == [c.setting for c in serial.candidates]
    for a, b in zip(on_ray.candidates, serial.candidates):  # same quality figure (and the same deterministic time)
        assert (a.drop, a.seconds, a.heldout_drop, bool(a.error)) == (b.drop, b.seconds, b.heldout_drop, bool(b.error))
    assert sum(c.evaluated for c in serial.candidates) > 3
    assert on_ray.setting == serial.setting and on_ray.drop == serial.drop


def test_conformance_shards_on_ray_give_the_serial_outcomes(ray_cluster):
    from nnforge import conformance

    names = conformance.sample([c.name for c in conformance.cases()], every=96)  # 20 cases: two shards of SHARD=16
    serial = conformance.run("onnxrt", names, jobs=1, progress=False)
    on_ray = conformance.run("onnxrt", names, progress=True, executor="ray")
    assert len(on_ray) == len(names) == len({r.name for r in on_ray})
    assert [(r.name, r.status) for r in on_ray] == [(r.name, r.status) for r in serial]


def test_zoo_bench_on_ray_gives_one_row_per_model_and_runner(ray_cluster):
    from nnforge.bench.harness import run_zoo

    runners = ["eager", "onnxruntime"]
    rows = run_zoo(["bert", "distilbert"], size="tiny", repeat=2, runners=runners, executor="ray")
    assert [(r.family, r.runner) for r in rows] == [(m, n) for m in ("bert", "distilbert") for n in runners]
    assert all(r.median_ms and r.median_ms > 0 and r.max_rel_error < 1e-3 for r in rows)
