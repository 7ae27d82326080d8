"""MetaSchedule tuning for the TVM backend's CPU kernels (``options={"tune": trials}``).

The fused module's kernels (after nnforge's legalize + fusion, before any schedule) become
MetaSchedule tasks; tuning records go into a JSON database (MetaSchedule's ``JSONDatabase``: JSON
lines, nothing pickled) keyed by each kernel's structural hash, in ``options["tune_db"]``,
``$NNFORGE_TUNE_DB`` or ``~/.cache/nnforge/tuning``. Kernels already in the database are not tuned
again. When compiling, ``MetaScheduleApplyDatabase`` runs before nnforge's default rules, which
skip what it scheduled, so kernels without a record keep the default schedules.

Tuning never makes a kernel slower: after tuning, ``vet`` times each kernel's best record against
nnforge's default schedule for it (tvm_schedule.py), with the same builder, runner and time evaluator
MetaSchedule measured its candidates with, side by side; only faster records are exported and applied.
The decisions are kept in ``tuning_verdicts.json`` (plain JSON) beside the database.

Candidates are built in this process: MetaSchedule's LocalBuilder starts worker processes that
each import TVM, which on a loaded 2-core machine exceeds its 30 s build timeout.

MetaSchedule's runner and cost model need packages nnforge installs only with the ``tune`` extra
(``pip install nnforge[tune]``); ``require_packages`` says so before any work starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import NnforgeError

# import name -> pip name: the runner's worker pool (cloudpickle, psutil, tornado), the cost model (xgboost)
TUNE_PACKAGES = {"cloudpickle": "cloudpickle", "psutil": "psutil", "tornado": "tornado", "xgboost": "xgboost-cpu"}


def require_packages() -> None:
    """NnforgeError naming the missing packages and the extra that installs them."""
    missing = [pip for name, pip in TUNE_PACKAGES.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise NnforgeError(
            f"MetaSchedule tuning needs {', '.join(missing)}, which are not installed: pip install nnforge[tune]"
        )


WORKLOAD_FILE = "tuning_workloads.json"  # flat names: bundles refuse files in subfolders
RECORD_FILE = "tuning_records.json"
VERDICT_FILE = "tuning_verdicts.json"  # kernel hash -> tuned vs default time; not shipped: bundles hold kept records


def db_dir(option=None, target: "tvm.target.Target | None" = None) -> Path:
    """The database directory; a cross target's records (e.g. an aarch64 farm's) in a subfolder named by its
    triple, as MetaSchedule looks a record up by kernel alone and would apply one target's to another."""
    root = Path(option or os.environ.get("NNFORGE_TUNE_DB") or Path.home() / ".cache" / "nnforge" / "tuning")
    triple = str(target.attrs.get("mtriple", "")) if target is not None else ""
    return root / triple if triple else root


def open_db(directory) -> "ms.database.JSONDatabase":
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(
        path_workload=str(d / WORKLOAD_FILE), path_tuning_record=str(d / RECORD_FILE), module_equality="structural"
    )


def tune_target(target: "tvm.target.Target", farm=None) -> "tvm.target.Target":
    """MetaSchedule needs the core count in the target: this machine's, or a farm device's (tvm_rpc)."""
    spec = dict(target.export())
    if farm is not None:
        spec.setdefault("num-cores", farm.device_threads())
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


def _runner(farm=None) -> "ms.runner.PyRunner":
    """Measures on this machine, or on the devices of a ``tvm_rpc.Farm``."""
    if farm is not None:
        from . import tvm_rpc

        return tvm_rpc.runner(farm)
    return ms.runner.LocalRunner(timeout_sec=120)  # MetaSchedule's default evaluator: number=3, min_repeat_ms=100


def _tasks(fused, target) -> list:
    """The kernels to tune: those nnforge's lowering did not schedule already."""
    return [
        t
        for t in ms.relax_integration.extract_tasks(fused, target)
        if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled", False)
    ]


def _has_space(context) -> bool:
    try:
        return len(context.generate_design_space()) > 0
    except Exception:  # noqa: BLE001  (TVM raises its own error types)
        return False


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    def __init__(self, report, total: int):
        self.report, self.total, self.done = report, total, 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.done += len(runner_results)
        self.report(f"tuning: {min(self.done, self.total)}/{self.total} trials")


def tune(fused: "tvm.IRModule", target: "tvm.target.Target", trials: int, database, stage, farm=None) -> dict:
    """Tune the kernels of ``fused`` that ``database`` has no record for; returns counts for the meta.
    ``farm``: measure on a TVM RPC tracker's devices (``tvm_rpc.Farm``) instead of this machine."""
    todo = _tasks(fused, target)
    new = [t for t in todo if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    stats = {"trials": 0, "kernels": len(todo), "from_db": len(todo) - len(new), "tuned": 0}
    if not new or trials <= 0:
        return stats
    # MetaSchedule's logging setup formats the name of every handler on its logger, and unnamed ones (pytest's log
    # capture) make it fail: leave those out
    log = logging.getLogger("tvm.s_tir.meta_schedule")
    for h in [h for h in log.handlers if h.get_name() is None]:
        log.removeHandler(h)
    with tempfile.TemporaryDirectory(prefix="nnforge-tune-") as work:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(new, work, num_threads=1)
        # MetaSchedule's space generator fails on some fused kernels (GPT's causal mask: "requires all the
        # producer(s) ... under the target loop"), which would abort every task: those keep the default schedule
        ok = [k for k, c in enumerate(contexts) if _has_space(c)]
        stats["untunable"] = len(contexts) - len(ok)
        contexts, weights, new = [contexts[k] for k in ok], [weights[k] for k in ok], [new[k] for k in ok]
        if not new:
            return stats
        progress = _Progress(stage, trials)
        # a share of the trials per round, so that 4 trials per kernel reach every kernel (ResNet-18: 50 kernels)
        per_iter = max(4, min(64, trials // len(new)))
        stage(f"tuning: 0/{trials} trials on {len(new)} kernel(s)")
        try:
            ms.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work,
                max_trials_global=trials,
                num_trials_per_iter=per_iter,
                builder=_InProcessBuilder(),
                runner=_runner(farm),
                database=database,
                measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default")) + [progress],
            )
        except Exception as e:
            raise NnforgeError(
                f"MetaSchedule tuning failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
            ) from e
    stats["trials"] = progress.done
    stats["tuned"] = sum(database.query_tuning_record(t.dispatched[0], target, t.task_name) is not None for t in new)
    return stats


def _key(mod) -> str:
    return str(tvm_ffi.structural_hash(mod))


def _record_us(rec) -> float:
    return round(sum(float(x) for x in rec.run_secs) / len(rec.run_secs) * 1e6, 3)


def load_verdicts(directory) -> dict:
    path = Path(directory) / VERDICT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def vet(
    fused: "tvm.IRModule", target: "tvm.target.Target", database, directory, stage, rounds: int = 2, farm=None
) -> dict:
    """Time each kernel's best record against nnforge's default schedule for it; note in ``directory``'s
    verdict file whether the tuned one is faster. Kernels already decided for this record are skipped."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    from .tvm_schedule import schedule_passes

    verdicts = load_verdicts(directory)
    todo = []
    for t in _tasks(fused, target):
        rec = database.query_tuning_record(t.dispatched[0], target, t.task_name)
        if rec is not None and rec.run_secs:
            v = verdicts.get(_key(t.dispatched[0]))
            if v is None or v.get("record_us") != _record_us(rec):  # a new best record is decided again
                todo.append((t, rec))
    runner = _runner(farm) if todo else None
    for n, (t, rec) in enumerate(todo):
        stage(f"tuning: checking kernel {n + 1}/{len(todo)} against the default schedule")
        mod = t.dispatched[0]
        key, tuned = _key(mod), database.query_ir_module(mod, target, t.task_name)
        copy = tvm.ir.load_json(tvm.ir.save_json(mod))  # dlight's rules may schedule the task's PrimFunc in place
        with target:
            default = tvm.transform.Sequential(schedule_passes(target, "default"))(copy)
        paths, us = {}, {"tuned": [], "default": []}
        try:
            for name, m in (("tuned", tuned), ("default", default)):
                try:
                    paths[name] = default_export(default_build(m, target, None))
                except Exception:  # noqa: BLE001  (a side that does not build cannot win)
                    pass
            # both sides in one runner, interleaved (tuned, default, default, tuned, ...) so load hits both alike
            order = [
                k
                for r in range(rounds)
                for k in (("tuned", "default") if r % 2 == 0 else ("default", "tuned"))
                if k in paths
            ]
            args = rec.args_info or ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            futures = runner.run([ms.runner.RunnerInput(paths[k], "cpu", args) for k in order])
            for k, f in zip(order, futures):
                res = f.result()
                if res.error_msg is None and res.run_secs:
                    us[k].append(sum(float(x) for x in res.run_secs) / len(res.run_secs) * 1e6)
        finally:
            for p in paths.values():
                shutil.rmtree(os.path.dirname(p), ignore_errors=True)
        tuned_us, default_us = min(us["tuned"], default=None), min(us["default"], default=None)
        keep = tuned_us is not None and (default_us is None or tuned_us < default_us)
        verdicts[key] = {
            "task": t.task_name,
            "record_us": _record_us(rec),
            "keep": keep,
            "tuned_us": tuned_us and round(tuned_us, 3),
            "default_us": default_us and round(default_us, 3),
        }
    if todo:
        Path(directory, VERDICT_FILE).write_text(json.dumps(verdicts, indent=1, sort_keys=True))
    decided = [verdicts.get(_key(t.dispatched[0])) for t in _tasks(fused, target)]
    return {
        "kept": sum(bool(v and v["keep"]) for v in decided),
        "dropped": sum(bool(v and not v["keep"]) for v in decided),
    }


def export_records(fused: "tvm.IRModule", target, database, directory, verdicts: dict | None = None) -> None:
    """Write the best record of each of ``fused``'s kernels into a JSON database in ``directory``, leaving out
    records that ``verdicts`` found slower than the default schedule."""
    out = open_db(directory)
    for t in ms.relax_integration.extract_tasks(fused, target):
        v = (verdicts or {}).get(_key(t.dispatched[0]))
        if v is not None and not v["keep"]:
            continue
        top = (
            database.get_top_k(database.commit_workload(t.dispatched[0]), 1)
            if database.has_workload(t.dispatched[0])
            else []
        )
        for rec in top:
            out.commit_tuning_record(
                ms.database.TuningRecord(
                    rec.trace, out.commit_workload(t.dispatched[0]), rec.run_secs, rec.target, rec.args_info
                )
            )
