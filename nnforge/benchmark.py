"""The bench harness: each model family through eager PyTorch, torch.compile, ONNX Runtime used
directly and nnforge's backends, in one process, as a rich table and a JSON file.

Benchmarks are not tests: nothing here asserts a time.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


@dataclass
class BenchRow:
    family: str
    runner: str
    median_ms: float | None
    speedup_vs_eager: float | None
    max_rel_error: float | None
    compile_s: float | None
    note: str = ""
    gflop: float | None = None  # the model's work per call
    peak_fraction: float | None = None  # achieved GFLOP/s over the measured matmul peak


def matmul_peak_gflops(n: int = 2048, repeat: int = 5) -> float:
    """fp32 GFLOP/s of ONNX Runtime's MatMul on an n^3 product: the machine's practical peak."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "peak", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ms = time_call(lambda: sess.run(None, {"x": a}), repeat, warmup=1)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def model_gflop(zm) -> float | None:
    """Multiply-add FLOPs of one call, counted on the imported IR."""
    try:
        from .api import import_model
        from .passes.budget import flops

        return flops(import_model(zm.model, zm.inputs), [x.numpy() for x in zm.inputs]) / 1e9
    except Exception:  # counting is best effort; the timings stand without it
        return None


def time_call(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 0.5:  # a slow runner (untuned TVM): a few samples say enough
        warmup, repeat = 0, min(repeat, 3)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def _as_list(out) -> list[np.ndarray]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs]


def _runners(zm, tune: int = 0):
    """(name, build) pairs; build() returns a zero-argument callable that runs the model once."""
    import torch

    model, inputs = zm.model, zm.inputs

    def eager():
        return lambda: model(*inputs)

    def compiled():
        fn = torch.compile(model)
        return lambda: fn(*inputs)

    def ort_direct():
        import onnxruntime as ort

        path = Path(tempfile.mkdtemp()) / "model.onnx"
        torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {n: x.numpy() for n, x in zip(names, inputs)}
        return lambda: sess.run(None, feed)

    def nnforge_backend(backend, trials=0):
        def build():
            import nnforge

            cm = nnforge.compile(model, inputs, target="cpu", backend=backend, check=False, progress=False,
                                 tune=trials, cache=False)
            arrays = [x.numpy() for x in inputs]
            return lambda: cm.run(arrays)

        return build

    def tvm_direct():
        from .backends.tvm_direct import build_direct

        return build_direct(model, inputs)

    return [("eager", eager), ("torch.compile", compiled), ("onnxruntime", ort_direct), ("tvm direct", tvm_direct),
            ("nnforge-onnxrt", nnforge_backend("onnxrt")), ("nnforge-tvm", nnforge_backend("tvm"))] + (
        [(f"nnforge-tvm tuned {tune}", nnforge_backend("tvm", tune))] if tune else [])


def bench_family(family: str, size: str = "bench", repeat: int = 20, progress=None, peak: float | None = None,
                 runners: Sequence[str] | None = None, tune: int = 0) -> list[BenchRow]:
    import torch

    from . import zoo

    zm = zoo.build(family, size, batch=1)
    gflop = model_gflop(zm)
    rows: list[BenchRow] = []
    ref = None
    eager_ms = None
    with torch.no_grad():
        for name, build in _runners(zm, tune):
            if runners and name not in runners and name != "eager":
                continue
            if progress:
                progress(f"{family}: {name}")
            t0 = time.perf_counter()
            try:
                fn = build()
                out = _as_list(fn())
                compile_s = time.perf_counter() - t0
                ms = time_call(fn, repeat)
            except Exception as e:  # a runner that cannot take the model is reported, not fatal
                rows.append(BenchRow(family, name, None, None, None, None, f"failed: {type(e).__name__}: {str(e)[:120]}"))
                continue
            from .passes.manager import max_rel_error

            if ref is None:
                ref, eager_ms = out, ms
            frac = gflop / (ms * 1e-3) / peak if gflop and peak else None
            rows.append(BenchRow(family, name, ms, eager_ms / ms, max_rel_error(ref, out),
                                 None if name == "eager" else compile_s, gflop=gflop, peak_fraction=frac))
    return rows


def render(rows: list[BenchRow]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="nnforge bench (median ms; speedup = eager ms / runner ms)")
    for col in ("family", "runner", "median ms", "speedup vs eager", "GFLOP", "% of peak", "max rel error", "compile s", "note"):
        table.add_column(col, justify="left" if col in ("family", "runner", "note") else "right")
    for r in rows:
        table.add_row(r.family, r.runner, f"{r.median_ms:.2f}" if r.median_ms is not None else "-",
                      f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else "-",
                      f"{r.gflop:.2f}" if r.gflop else "-",
                      f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction else "-",
                      f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else "-",
                      f"{r.compile_s:.1f}" if r.compile_s is not None else "-", r.note)
    console = Console(record=True, width=140, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


def run_bench(families=None, size: str = "bench", json_path: str | None = None, repeat: int = 20,
              runners: Sequence[str] | None = None, plot: str | None = None, tune: int = 0) -> list[BenchRow]:
    from rich.console import Console

    from . import zoo

    console = Console(stderr=True)
    rows: list[BenchRow] = []
    with console.status("bench: measuring the matmul peak") as status:
        peak = matmul_peak_gflops()
        for fam in families or zoo.FAMILIES:
            rows += bench_family(fam, size, repeat, progress=lambda m: status.update(f"bench: {m}"), peak=peak,
                                 runners=runners, tune=tune)
    print(render(rows))
    print(f"matmul peak (ONNX Runtime, fp32 2048^3): {peak:.0f} GFLOP/s")
    if plot:
        plot_ratios(rows, plot)
        print(f"plot written to {plot}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(f"results written to {json_path}")
    return rows


def run_pareto(path: str, size: str = "bench", batches: int = 4) -> None:
    """Budget search on the ViT family (random weights, cosine vs the lossless model), timed on ONNX Runtime;
    saves the speed-vs-quality plot of every candidate to ``path``."""
    import torch

    from . import zoo
    from .api import import_model
    from .backends.base import get_backend
    from .passes.blocks import prepare
    from .passes.budget import Budget, plot_pareto, search, wall_time
    from .targets import get_target

    zm = zoo.build("vit", size, batch=1)
    gen = torch.Generator().manual_seed(1)
    data = [[torch.randn(zm.inputs[0].shape, generator=gen).numpy()] for _ in range(batches)]
    graph = prepare(import_model(zm.model, zm.inputs))
    backend, target = get_backend("onnxrt"), get_target("cpu")
    result = search(graph, Budget(metric="cosine", max_drop=0.02), data[: batches // 2], data[batches // 2:],
                    time_fn=wall_time(lambda g: backend.build(g, target, {}).run, data[0]), progress=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_pareto(result, path)
    print(result.report())
    print(f"plot written to {path}")


def plot_ratios(rows: list[BenchRow], path: str) -> None:
    """Bar chart of each runner's speed-up over eager, per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows))
    runners = list(dict.fromkeys(r.runner for r in rows))
    width = 0.8 / max(1, len(runners))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(families)), 4))
    for k, runner in enumerate(runners):
        vals = [next((r.speedup_vs_eager or 0 for r in rows if r.family == f and r.runner == runner), 0) for f in families]
        ax.bar([i + k * width for i in range(len(families))], vals, width, label=runner)
    ax.set_xticks([i + width * (len(runners) - 1) / 2 for i in range(len(families))], families)
    ax.set_ylabel("speed-up over eager PyTorch")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
