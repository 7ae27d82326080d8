"""MetaSchedule tuning for the TVM backend's CPU kernels (``options={"tune": trials}``).

The fused module's kernels (after nnforge's legalize + fusion, before any schedule) become
MetaSchedule tasks; tuning records go into a JSON database (MetaSchedule's ``JSONDatabase``: JSON
lines, nothing pickled) keyed by each kernel's structural hash, in ``options["tune_db"]``,
``$NNFORGE_TUNE_DB`` or ``~/.cache/nnforge/tuning``. Kernels already in the database are not tuned
again. When compiling, ``MetaScheduleApplyDatabase`` runs before nnforge's default rules, which
skip what it scheduled, so kernels without a record keep the default schedules.

Candidates are built in this process: MetaSchedule's LocalBuilder starts worker processes that
each import TVM, which on a loaded 2-core machine exceeds its 30 s build timeout.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import NnforgeError

WORKLOAD_FILE = "tuning_workloads.json"  # flat names: bundles refuse files in subfolders
RECORD_FILE = "tuning_records.json"


def db_dir(option=None) -> Path:
    return Path(option or os.environ.get("NNFORGE_TUNE_DB") or Path.home() / ".cache" / "nnforge" / "tuning")


def open_db(directory) -> "ms.database.JSONDatabase":
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(d / WORKLOAD_FILE), path_tuning_record=str(d / RECORD_FILE),
                                    module_equality="structural")


def tune_target(target: "tvm.target.Target") -> "tvm.target.Target":
    """MetaSchedule needs the core count in the target."""
    spec = dict(target.export())
    spec.setdefault("num-cores", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    return tvm.target.Target({k: v for k, v in spec.items() if k in ("kind", "mcpu", "mtriple", "mattr", "num-cores")})


@derived_object
class _InProcessBuilder(ms.builder.PyBuilder):
    def build(self, build_inputs):
        from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

        out = []
        for bi in build_inputs:
            try:
                out.append(ms.builder.BuilderResult(default_export(default_build(bi.mod, bi.target, None)), None))
            except Exception as e:  # a candidate that does not build is a failed trial, not a failed tune
                out.append(ms.builder.BuilderResult(None, str(e)))
        return out


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.done += len(runner_results)
        self.report(f"tuning: {min(self.done, self.total)}/{self.total} trials")


def tune(fused: "tvm.IRModule", target: "tvm.target.Target", trials: int, database, stage) -> dict:
    """Tune the kernels of ``fused`` that ``database`` has no record for; returns counts for the meta."""
    tasks = ms.relax_integration.extract_tasks(fused, target)
    todo = [t for t in tasks if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled", False)]
    new = [t for t in todo if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    stats = {"trials": 0, "kernels": len(todo), "from_db": len(todo) - len(new), "tuned": 0}
    if not new or trials <= 0:
        return stats
    with tempfile.TemporaryDirectory(prefix="nnforge-tune-") as work:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(new, work, num_threads=1)
        progress = _Progress(stage, trials)
        stage(f"tuning: 0/{trials} trials on {len(new)} kernel(s)")
        try:
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work, max_trials_global=trials,
                          num_trials_per_iter=min(64, trials), builder=_InProcessBuilder(),
                          runner=ms.runner.LocalRunner(timeout_sec=120), database=database,
                          measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default")) + [progress])
        except Exception as e:
            raise NnforgeError(f"MetaSchedule tuning failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
    stats["trials"] = progress.done
    stats["tuned"] = sum(database.query_tuning_record(t.dispatched[0], target, t.task_name) is not None for t in new)
    return stats


def export_records(fused: "tvm.IRModule", target, database, directory) -> None:
    """Write the best record of each of ``fused``'s kernels into a JSON database in ``directory``."""
    out = open_db(directory)
    for t in ms.relax_integration.extract_tasks(fused, target):
        top = database.get_top_k(database.commit_workload(t.dispatched[0]), 1) \
            if database.has_workload(t.dispatched[0]) else []
        for rec in top:
            out.commit_tuning_record(ms.database.TuningRecord(rec.trace, out.commit_workload(t.dispatched[0]),
                                                              rec.run_secs, rec.target, rec.args_info))
