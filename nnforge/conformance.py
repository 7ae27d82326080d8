"""ONNX backend node-test conformance: the onnx wheel's own node tests, run through nnforge.

The tests are generated in memory from the installed onnx wheel
(``onnx.backend.test.case.node.collect_testcases``: 1884 cases with onnx 1.23), so nothing is
downloaded and nothing is written here by hand. Each case is compiled with ``nnforge.compile`` on
one backend and its outputs compared the way ONNX's own runner compares them (count, shape,
dtype, then ``allclose`` with the case's rtol/atol). Outcomes:

- ``pass``;
- ``wrong``: it ran and an output differs (the worst kind of failure);
- ``refused``: nnforge refused it with its own error naming the problem (an unsupported op, a
  dtype, an input kind);
- ``error``: another exception, i.e. a crash deep in a library;
- ``crash``: the worker process died or hung (``--timeout``).

Cases run in worker processes that report one JSON line per case, so a segfault or a hang costs one
case, not the run. ``backend="ort"`` runs ONNX Runtime directly on the same cases, to set nnforge's
counts beside it. ``python -m nnforge.conformance --backend onnxrt tvm ort`` (``make
conformance``) runs the whole suite; the tests run a fixed sample (``sample``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("onnxrt", "tvm", "ort")
# outputs that are random by definition (training-mode dropout masks): ONNX's own runner skips them
RANDOM_CASES = ("test_dropout_random", "test_training_dropout")


@dataclass
class Result:
    name: str
    backend: str
    status: str  # pass | wrong | refused | error | crash | random
    detail: str = ""
    seconds: float = 0.0


def cases(names=None) -> list:
    """The node test cases of the installed onnx wheel (optionally only ``names``), in name order."""
    import onnx.backend.test.case.node as node_tests

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        found = sorted(node_tests.collect_testcases(None), key=lambda c: c.name)
    if names is not None:
        wanted = set(names)
        found = [c for c in found if c.name in wanted]
    return found


@dataclass
class ModelCase:
    """One of the model-zoo CNNs the onnx wheel ships as "light" models (opset 9, weights made by
    ConstantOfShape); inputs are seeded random, expected outputs ONNX Runtime's on the file as is."""

    name: str
    path: str
    rtol: float = 1e-3
    atol: float = 1e-4

    @property
    def model(self):
        import onnx

        return onnx.load(self.path)

    @property
    def data_sets(self):
        from onnx import helper

        from .backends.onnxrt import run_onnx_directly

        model = self.model
        inits = {t.name for t in model.graph.initializer}
        rng = np.random.default_rng(0)
        inputs = []
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            tt = vi.type.tensor_type
            shape = [d.dim_value or 1 for d in tt.shape.dim]
            inputs.append(rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
        return [(inputs, run_onnx_directly(model, inputs))]


def model_cases() -> list[ModelCase]:
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return [ModelCase(f"model_{p.stem.removeprefix('light_')}", str(p)) for p in sorted(light.glob("light_*.onnx"))]


def sample(all_names: list[str], every: int = 8) -> list[str]:
    """A fixed, spread-out subset for the test suite: every ``every``-th case in name order."""
    return sorted(all_names)[::every]


def _array(x):
    """A test input or expected output as numpy (the generators also give TensorProtos and numpy scalars)."""
    from onnx import TensorProto, numpy_helper

    if isinstance(x, TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, (list, tuple)):
        return [_array(v) for v in x]
    return x if isinstance(x, (dict, type(None))) else np.asarray(x)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _compare(expected: list, got: list, rtol: float, atol: float) -> str | None:
    """None when equal the way ONNX's runner judges it; else what differs."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (ref, out) in enumerate(zip(expected, got)):
        if isinstance(ref, (list, tuple)) or isinstance(out, (list, tuple)):
            if not isinstance(ref, (list, tuple)) or not isinstance(out, (list, tuple)):
                return f"output {k}: sequence vs tensor"
            bad = _compare(list(ref), list(out), rtol, atol)
            if bad:
                return f"output {k}: {bad}"
            continue
        ref, out = np.asarray(ref), np.asarray(out)
        if out.shape != ref.shape:
            return f"output {k}: shape {out.shape}, expected {ref.shape}"
        if out.dtype != ref.dtype:
            return f"output {k}: dtype {out.dtype}, expected {ref.dtype}"
        if ref.dtype == object or ref.dtype.kind in "USb":
            if not np.array_equal(out, ref):
                return f"output {k}: values differ"
            continue
        odd_float = ref.dtype.kind == "V" and "float" in ref.dtype.name  # ml_dtypes' bfloat16, float8, float4
        if ref.dtype.kind not in "fc" and not odd_float:  # integers (also int4/int2) compare exactly
            if not np.array_equal(out.astype(np.float64), ref.astype(np.float64)):
                return f"output {k}: values differ"
            continue
        with np.errstate(all="ignore"):
            r = ref.astype(np.float64) if ref.dtype.kind in "fV" else ref
            o = out.astype(np.float64) if ref.dtype.kind in "fV" else out.astype(ref.dtype)
            ok = np.isclose(o, r, rtol=rtol, atol=atol, equal_nan=True)
        if not ok.all():
            i = int(np.argmin(ok.reshape(-1)))
            return (
                f"output {k}: {int((~ok).sum())}/{ok.size} values differ "
                f"(e.g. got {o.reshape(-1)[i]!r}, expected {r.reshape(-1)[i]!r})"
            )
    return None


def _run_ort(model, inputs: list) -> list:
    from .backends.onnxrt import run_onnx_directly

    return run_onnx_directly(model, inputs, threads=1)


TARGET = os.environ.get("NNFORGE_CONFORMANCE_TARGET", "cpu")  # the workers' target (--target)


def _run_nnforge(model, inputs: list, backend: str) -> list:
    import nnforge

    compiled = nnforge.compile(model, inputs, TARGET, backend=backend, check=False, cache=False, progress=False)
    out = compiled(*inputs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def run_case(case, backend: str) -> Result:
    """Compile and run one case on ``backend``; never raises."""
    from .errors import NnforgeError

    t0 = time.perf_counter()
    if any(case.name.startswith(p) for p in RANDOM_CASES):
        return Result(case.name, backend, "random", "random outputs by definition")
    if isinstance(case, ModelCase) and backend == "ort":
        return Result(case.name, backend, "reference", "ONNX Runtime's outputs are the reference")
    status, detail = "pass", ""
    try:
        for inputs, expected in case.data_sets:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
                got = _run_ort(case.model, inputs) if backend == "ort" else _run_nnforge(case.model, inputs, backend)
            bad = _compare(expected, got, case.rtol, case.atol)
            if bad:
                status, detail = "wrong", bad
                break
    except NnforgeError as e:
        status, detail = "refused", _first_line(e)
    except Exception as e:  # noqa: BLE001 - a library crash is an outcome to count, not to stop at
        status, detail = "error", _first_line(e)
        if backend == "ort":  # ONNX Runtime's own failures are its refusals
            status = "refused"
        if os.environ.get("NNFORGE_CONFORMANCE_TRACE"):
            traceback.print_exc()
    return Result(case.name, backend, status, detail, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# worker processes: one JSON line per case, so a dying worker costs one case
# ---------------------------------------------------------------------------------------


def _worker(backend: str, names: list[str]) -> None:
    models = {c.name: c for c in model_cases() if c.name in names}
    for case in cases([n for n in names if n not in models]) + list(models.values()):
        print(json.dumps({"start": case.name}), flush=True)
        print(json.dumps(asdict(run_case(case, backend))), flush=True)


def _drain(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def run_shard(backend: str, names: list[str], timeout: float, on_result) -> None:
    """Run ``names`` in a worker; a case whose worker dies or stalls past ``timeout`` s is a crash."""
    todo = list(names)
    while todo:
        env = dict(os.environ, TVM_LOG_DEBUG="0", OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nnforge.conformance", "--worker", backend, *todo],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_drain, args=(proc, lines), daemon=True).start()
        current = None
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                line = None
                if current:
                    current_detail = f"no answer in {timeout:.0f} s"
            if line is None:
                break
            doc = json.loads(line)
            if "start" in doc:
                current, current_detail = doc["start"], None
                continue
            on_result(Result(**doc))
            todo.remove(doc["name"])
            current = None
        proc.wait()
        if current is not None:
            detail = current_detail or f"worker died (exit code {proc.returncode})"
            on_result(Result(current, backend, "crash", detail))
            todo.remove(current)
        elif todo and proc.returncode:
            for name in todo:
                on_result(Result(name, backend, "crash", f"worker failed to start (exit {proc.returncode})"))
            todo = []


SHARD = 16  # cases per Ray task: progress in steps of 16, and a worker process started per 16 cases


def shard_results(names: list[str], backend: str, timeout: float, target: str) -> list[Result]:
    """``names`` run in a worker process, as a Ray task: the results in a list."""
    os.environ["NNFORGE_CONFORMANCE_TARGET"] = target  # the Ray worker's environment is not the driver's
    results: list[Result] = []
    run_shard(backend, names, timeout, results.append)
    return results


def run(
    backend: str,
    names: list[str],
    jobs: int = 2,
    timeout: float = 300,
    progress: bool = True,
    executor: str | None = None,
) -> list[Result]:
    """All ``names`` on ``backend``, split over ``jobs`` worker processes, or in shards of ``SHARD`` cases
    as Ray tasks (``executor`` "ray" or a Ray address; ``nnforge.scale``)."""
    from rich.progress import Progress

    from . import scale

    if scale.wants_ray(executor):
        shards = [names[k : k + SHARD] for k in range(0, len(names), SHARD)]
        target = os.environ.get("NNFORGE_CONFORMANCE_TARGET", "cpu")  # main() sets it after TARGET was read
        run_one = functools.partial(shard_results, backend=backend, timeout=timeout, target=target)
        done = scale.map_items(run_one, shards, f"ONNX node tests on {backend}", executor, progress, describe=_span)
        return sorted((r for shard in done for r in shard), key=lambda r: r.name)

    results: list[Result] = []
    lock = threading.Lock()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"ONNX node tests on {backend}", total=len(names))

        def on_result(r: Result) -> None:
            with lock:
                results.append(r)
                bar.advance(task)

        shards = [names[k::jobs] for k in range(jobs)]
        threads = [threading.Thread(target=run_shard, args=(backend, s, timeout, on_result)) for s in shards if s]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sorted(results, key=lambda r: r.name)


def _span(shard: list[str]) -> str:
    return f"{shard[0]} .. {shard[-1]}"


def summary(results: list[Result]) -> dict:
    return dict(Counter(r.status for r in results))


def own_wrong(results: list[Result], ort: list[Result]) -> list[Result]:
    """Wrong answers ONNX Runtime used directly does not give too (those nnforge would only pass through)."""
    ort_wrong = {r.name for r in ort if r.status == "wrong"}
    return [r for r in results if r.status == "wrong" and r.name not in ort_wrong]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnforge.conformance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["onnxrt", "tvm", "ort"], choices=BACKENDS)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--models", action="store_true", help="also the nine model-zoo CNNs the onnx wheel ships")
    ap.add_argument("--sample", type=int, default=1, help="every N-th case only (the test suite uses 8)")
    ap.add_argument("--target", default="cpu", help="nnforge's target (cuda where a GPU is)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument(
        "--ray",
        nargs="?",
        const="ray",
        default=None,
        metavar="ADDRESS",
        help="run the cases as Ray tasks (on the cluster at ADDRESS, $RAY_ADDRESS, or a local one)",
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds a case may take")
    ap.add_argument("--out", type=Path, help="write every result as JSON here")
    ap.add_argument("--floor", nargs="*", default=[], help="BACKEND=N: fail when fewer pass (and on own wrong answers)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1:])
        return 0
    os.environ["NNFORGE_CONFORMANCE_TARGET"] = args.target  # the workers inherit it
    names = args.only or sample([c.name for c in cases()], args.sample)
    models = [c.name for c in model_cases()] if args.models else []
    everything = {}
    for backend in args.backend:
        res = run(backend, names, args.jobs, args.timeout, executor=args.ray)
        everything[backend] = res
        print(f"{backend}: {len(res)} cases: {summary(res)}", flush=True)
        if models and backend != "ort":
            zoo = run(backend, models, args.jobs, args.timeout, executor=args.ray)
            everything[f"{backend} (model zoo)"] = zoo
            print(f"{backend}: model zoo: " + ", ".join(f"{r.name} {r.status} {r.detail}".strip() for r in zoo))
    if args.out:
        doc = {b: [asdict(r) for r in res] for b, res in everything.items()}
        args.out.write_text(json.dumps(doc, indent=0))
    failed = False
    for spec in args.floor:
        backend, _, n = spec.partition("=")
        res = everything.get(backend, [])
        passed = sum(r.status == "pass" for r in res)
        own = own_wrong(res, everything["ort"]) if "ort" in everything else []
        print(f"{backend}: {passed} pass (floor {n}); wrong answers ONNX Runtime does not give: {len(own)}")
        for r in own:
            print(f"  {r.name}: {r.detail}")
        failed |= passed < int(n) or bool(own)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
