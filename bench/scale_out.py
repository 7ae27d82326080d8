"""What fanning out buys on this host: the budget search and the zoo bench serial vs on a local Ray cluster, and
MetaSchedule tuning measured on one vs two TVM RPC servers; the per-item times the projections in
docs/scale-out.md are made from.

    python bench/scale_out.py                     # all three parts, JSON to bench/results/scale_out.json
    python bench/scale_out.py --part budget zoo   # only some

Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # time this checkout's nnforge, not an installed one

from nnforge import scale  # noqa: E402
from nnforge.passes import budget as nb  # noqa: E402

BUDGET_SPACE = dict(merge_r=[0, 4, 8], prune_keep=[1.0, 0.7], skip=[0, 1], quantize=["float", "int8"])
ZOO_MODELS = ["bert", "distilbert", "gpt2", "vit_s16", "resnet50", "mobilenetv3"]
ZOO_RUNNERS = ["eager", "onnxruntime", "nnforge-onnxrt"]


def part_budget(workers: int) -> dict:
    from nnforge.models.digits import digits_vit

    d = digits_vit()
    cal, held = d.calibration(), d.heldout()
    time_fn = nb.flop_time(cal[0])
    metric = nb.metric_fn("cosine")
    t0 = time.perf_counter()
    serial = nb.search(d.graph, nb.Budget(executor="serial", **BUDGET_SPACE), cal, held, time_fn)
    serial_s = time.perf_counter() - t0
    # the work of each candidate alone (build + quality on calibration), for the projections
    ref = nb.outputs(d.graph, cal)
    per = []
    for c in serial.candidates:
        t = time.perf_counter()
        nb._quality(d.graph, c.setting, cal, metric, nb.interpret, ref)
        per.append(time.perf_counter() - t)
    t = time.perf_counter()
    nb.outputs(d.graph, cal), nb.outputs(d.graph, held)  # the search's serial part: reference outputs
    reference_s = time.perf_counter() - t
    t0 = time.perf_counter()
    on_ray = nb.search(d.graph, nb.Budget(executor="ray", **BUDGET_SPACE), cal, held, time_fn)
    ray_s = time.perf_counter() - t0
    same = [(a.drop, a.error != "") for a in on_ray.candidates] == [(b.drop, b.error != "") for b in serial.candidates]
    return {
        "candidates": len(serial.candidates),
        "evaluated_serially": sum(c.evaluated for c in serial.candidates),
        "serial_s": serial_s,
        f"ray_{workers}_workers_s": ray_s,
        "candidate_s": per,
        "reference_outputs_s": reference_s,
        "same_quality_figures": same,
        "chosen": [str(serial.setting), str(on_ray.setting)],
    }


def part_zoo() -> dict:
    from nnforge.bench.harness import zoo_rows

    per = {}
    t0 = time.perf_counter()
    for name in ZOO_MODELS:
        t = time.perf_counter()
        zoo_rows(name, "tiny", 5, ZOO_RUNNERS)
        per[name] = time.perf_counter() - t
    serial_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    import functools

    scale.map_items(functools.partial(zoo_rows, size="tiny", repeat=5, runners=ZOO_RUNNERS), ZOO_MODELS, "zoo")
    return {"models": ZOO_MODELS, "serial_s": serial_s, "ray_s": time.perf_counter() - t0, "model_s": per}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def part_tune(trials: int) -> dict:
    """The same tune (a fresh database each time) measured on one, then two RPC servers."""
    import tempfile

    import torch

    import nnforge
    from nnforge.backends import tvm_rpc

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU()).eval()
    x = torch.randn(64, 256)
    out = {"trials": trials}
    stages: list = []
    for servers in (1, 2):
        port = _free_port()
        procs = [
            _spawn("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
        ]
        try:
            farm = tvm_rpc.Farm("127.0.0.1", port, "bench")
            for _ in range(120):  # the tracker imports TVM first
                try:
                    farm.devices()
                    break
                except Exception:  # noqa: BLE001  (not listening yet)
                    time.sleep(0.5)
            for _ in range(servers):
                p = _free_port()
                procs.append(
                    _spawn(
                        "tvm.exec.rpc_server",
                        *("--host", "127.0.0.1", "--port", str(p), "--port-end", str(p + 50)),
                        *("--tracker", f"127.0.0.1:{port}", "--key", "bench"),
                    )
                )
            while farm.devices() < servers:
                time.sleep(0.5)
            stages.clear()
            with tempfile.TemporaryDirectory() as db:
                options = {"tune_rpc": f"127.0.0.1:{port}", "tune_key": "bench", "tune_db": db}
                options["progress"] = lambda m: stages.append((time.perf_counter(), m))
                t0 = time.perf_counter()
                cm = nnforge.compile(model, (x,), backend="tvm", tune=trials, options=options, check=False, cache=False)
                total = time.perf_counter() - t0
            tuning_start = next(t for t, m in stages if m.startswith("tuning: 0/"))
            tuning_end = next(t for t, m in stages if m.startswith("tuning: checking") or m.startswith("compiling"))
            out[f"{servers}_servers"] = {
                "total_s": total,
                "tuning_s": tuning_end - tuning_start,
                "trials_run": cm.artifact.meta["tuning"]["trials"],
            }
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", nargs="+", default=["budget", "zoo", "tune"], choices=["budget", "zoo", "tune"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--json", default="bench/results/scale_out.json")
    args = ap.parse_args()
    path = Path(args.json)
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["host_cpus"] = os.cpu_count()
    if "budget" in args.part or "zoo" in args.part:
        t0 = time.perf_counter()
        scale.start_local(num_cpus=args.workers)
        doc["ray_start_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    for part, run in (
        ("budget", lambda: part_budget(args.workers)),
        ("zoo", part_zoo),
        ("tune", lambda: part_tune(args.trials)),
    ):
        if part in args.part:
            doc[part] = run()
            print(json.dumps(doc[part]), flush=True)
            path.write_text(json.dumps(doc, indent=1))  # after each part: a failure later keeps it


if __name__ == "__main__":
    main()
