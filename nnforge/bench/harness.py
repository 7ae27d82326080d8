"""The bench harness: each model family through eager PyTorch, torch.compile, ONNX Runtime used
directly and nnforge's backends, in one process, as a rich table and a JSON file.

Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import functools
import io
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
    """GFLOP of one call, counted on the imported IR: two per multiply-add, as the matmul peak counts them."""
    try:
        from ..api import import_model
        from ..passes.budget import flops

        return 2 * flops(import_model(zm.model, zm.inputs), [x.numpy() for x in zm.inputs]) / 1e9
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


def time_interleaved(fns: dict, repeat: int, rounds: int = 3, progress=None, label: str = "") -> dict:
    """Median ms per callable in ``fns`` (key -> fn), timed in ``rounds`` interleaved rounds; each keeps
    its best round, so that load from other processes hits every callable alike."""
    best: dict = {}
    for k in range(rounds):
        if progress:
            progress(f"{label}timing, round {k + 1} of {rounds}")
        for key, fn in fns.items():
            best[key] = min(best.get(key, float("inf")), time_call(fn, max(1, repeat // rounds)))
    return best


def _as_list(out) -> list[np.ndarray]:
    """A runner's outputs as arrays, flattened (a transformers ModelOutput or a nested tuple too)."""
    from torch.utils import _pytree as pytree

    leaves = [o for o in pytree.tree_leaves(out) if o is not None]
    return [o.detach().numpy() if hasattr(o, "detach") else np.asarray(o) for o in leaves]


def _runners(zm, tune: int = 0, progress=None):
    """(name, build) pairs; build() returns a zero-argument callable that runs the model once.
    ``progress``: takes the tuned build's stages (trials done, kernels checked against the default schedule)."""
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

            say = {"progress": lambda m: progress(f"nnforge-tvm tuned {trials}: {m}")} if trials and progress else None
            cm = nnforge.compile(
                model,
                inputs,
                target="cpu",
                backend=backend,
                check=False,
                progress=False,
                tune=trials,
                cache=False,
                options=say,
            )
            arrays = [x.numpy() for x in inputs]
            fn = lambda: cm.run(arrays)  # noqa: E731
            t = (getattr(cm.artifact, "meta", None) or {}).get("tuning")
            if t:  # how many tuned kernels beat the default schedule (tvm_tune.vet) and were applied
                fn.note = f"tuned kernels applied: {t.get('kept', 0)}/{t['kernels']}; trials run now: {t['trials']}"
            return fn

        return build

    def tvm_direct():
        from ..backends.tvm_direct import build_direct

        return build_direct(model, inputs)

    return [
        ("eager", eager),
        ("torch.compile", compiled),
        ("onnxruntime", ort_direct),
        ("tvm direct", tvm_direct),
        ("nnforge-onnxrt", nnforge_backend("onnxrt")),
        ("nnforge-tvm", nnforge_backend("tvm")),
    ] + ([(f"nnforge-tvm tuned {tune}", nnforge_backend("tvm", tune))] if tune else [])


def bench_family(
    family: str,
    size: str = "bench",
    repeat: int = 20,
    progress=None,
    peak: float | None = None,
    runners: Sequence[str] | None = None,
    tune: int = 0,
    rounds: int = 3,
    zm=None,
) -> list[BenchRow]:
    """Every runner is built first, then timed in ``rounds`` interleaved rounds (each runner's best round
    counts), so that load from other processes hits every runner alike. ``zm``: the model to time (a
    ``ZooModel``), default the zoo family ``family`` at ``size``."""
    import torch

    from ..models import zoo
    from ..passes.manager import max_rel_error

    zm = zm or zoo.build(family, size, batch=1)
    gflop = model_gflop(zm)
    built = []  # (name, fn, output, compile s) or (name, None, None, failure note)
    with torch.no_grad():
        for name, build in _runners(zm, tune, (lambda m: progress(f"{family}: {m}")) if progress else None):
            if runners and name not in runners and name != "eager":
                continue
            if progress:
                progress(f"{family}: {name}")
            t0 = time.perf_counter()
            try:
                fn = build()
                built.append((name, fn, _as_list(fn()), time.perf_counter() - t0))
            except Exception as e:  # a runner that cannot take the model is reported, not fatal
                built.append((name, None, None, f"failed: {type(e).__name__}: {str(e)[:120]}"))
        best = time_interleaved(
            {name: fn for name, fn, _, _ in built if fn is not None}, repeat, rounds, progress, f"{family}: "
        )
    rows: list[BenchRow] = []
    first = next((b for b in built if b[1] is not None), None)  # eager, unless it failed
    ref, eager_ms = (first[2], best[first[0]]) if first else (None, None)
    for name, fn, out, extra in built:
        if fn is None:
            rows.append(BenchRow(family, name, None, None, None, None, extra))
            continue
        ms = best[name]
        frac = gflop / (ms * 1e-3) / peak if gflop and peak else None
        rows.append(
            BenchRow(
                family,
                name,
                ms,
                eager_ms / ms if eager_ms else None,
                max_rel_error(ref, out),
                None if name == "eager" else extra,
                getattr(fn, "note", ""),
                gflop=gflop,
                peak_fraction=frac,
            )
        )
    return rows


def _table_text(title: str, columns: Sequence[str], left: Sequence[str], cells, width: int) -> str:
    """A rich table rendered to plain text (for the terminal and the tests)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    for row in cells:
        table.add_row(*row)
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(table)
    return console.export_text()


def render(rows: list[BenchRow]) -> str:
    cells = [
        (
            r.family,
            r.runner,
            f"{r.median_ms:.2f}" if r.median_ms is not None else "-",
            f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else "-",
            f"{r.gflop:.2f}" if r.gflop else "-",
            f"{100 * r.peak_fraction:.0f}%" if r.peak_fraction else "-",
            f"{r.max_rel_error:.1e}" if r.max_rel_error is not None else "-",
            f"{r.compile_s:.1f}" if r.compile_s is not None else "-",
            r.note,
        )
        for r in rows
    ]
    return _table_text(
        "nnforge bench (median ms; speedup = eager ms / runner ms)",
        (
            "family",
            "runner",
            "median ms",
            "speedup vs eager",
            "GFLOP",
            "% of peak",
            "max rel error",
            "compile s",
            "note",
        ),
        ("family", "runner", "note"),
        cells,
        140,
    )


def run_bench(
    families=None,
    size: str = "bench",
    json_path: str | None = None,
    repeat: int = 20,
    runners: Sequence[str] | None = None,
    plot: str | None = None,
    tune: int = 0,
) -> list[BenchRow]:
    from rich.console import Console

    from ..models import zoo

    console = Console(stderr=True)
    rows: list[BenchRow] = []
    with console.status("bench: measuring the matmul peak") as status:
        peak = matmul_peak_gflops()
        for fam in families or zoo.FAMILIES:
            rows += bench_family(
                fam,
                size,
                repeat,
                progress=lambda m: status.update(f"bench: {m}"),
                peak=peak,
                runners=runners,
                tune=tune,
            )
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


# ---------------------------------------------------------------------------------------
# nnforge bench --zoo: the real architectures of nnforge.models.real
# ---------------------------------------------------------------------------------------

ZOO_RUNNERS = ("eager", "torch.compile", "onnxruntime", "nnforge-onnxrt", "nnforge-tvm")


def zoo_rows(name: str, size: str, repeat: int, runners: Sequence[str] | None, progress=None) -> list[BenchRow]:
    """One real architecture through the zoo runners (a Ray task of ``run_zoo(..., executor="ray")``)."""
    from ..models import real
    from ..models.zoo import ZooModel

    if progress:
        progress(f"{name}: building")
    model, inputs = real.build(name, size)
    zm = ZooModel(name, model, tuple(inputs), None, ())
    return bench_family(name, size, repeat, progress=progress, runners=runners or ZOO_RUNNERS, zm=zm)


def run_zoo(
    names: Sequence[str] | None = None,
    size: str = "bench",
    json_path: str | None = None,
    repeat: int = 20,
    runners: Sequence[str] | None = None,
    executor: str | None = None,
) -> list[BenchRow]:
    """Each real architecture (``nnforge.models.real``) through eager, torch.compile, ONNX Runtime used
    directly and nnforge's backends, timed as ``nnforge bench`` times the families; one table.
    ``executor``: "ray" or a Ray address times each model in a Ray task (``nnforge.scale``); one model's
    runners stay together, so the times within a row are comparable as serially."""
    from rich.console import Console

    from .. import scale
    from ..models import real

    rows: list[BenchRow] = []
    names = list(names or real.ZOO)

    def save() -> None:
        if json_path:  # after every model: a long run that is stopped keeps what it measured
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=1))

    if scale.wants_ray(executor):
        for model_rows in scale.map_items(
            functools.partial(zoo_rows, size=size, repeat=repeat, runners=runners), names, "bench --zoo", executor
        ):
            rows += model_rows
        save()
    else:
        with Console(stderr=True).status("bench --zoo") as status:
            for k, name in enumerate(names):
                say = lambda m, k=k: status.update(f"bench --zoo ({k + 1} of {len(names)}): {m}")  # noqa: E731
                rows += zoo_rows(name, size, repeat, runners, progress=say)
                save()
    print(render(rows))
    if json_path:
        print(f"results written to {json_path}")
    return rows


def run_pareto(path: str, size: str = "bench", batches: int = 4) -> None:
    """Budget search on the ViT family (random weights, cosine vs the lossless model), timed on ONNX Runtime;
    saves the speed-vs-quality plot of every candidate to ``path``."""
    import torch

    from .. import partition
    from ..api import import_model
    from ..models import zoo
    from ..passes.blocks import prepare
    from ..passes.budget import Budget, plot_pareto, search, wall_time

    zm = zoo.build("vit", size, batch=1)
    gen = torch.Generator().manual_seed(1)
    data = [[torch.randn(zm.inputs[0].shape, generator=gen).numpy()] for _ in range(batches)]
    graph = prepare(import_model(zm.model, zm.inputs))
    settings = partition.BuildSettings.resolve("cpu", "onnxrt")
    result = search(
        graph,
        Budget(metric="cosine", max_drop=0.02),
        data[: batches // 2],
        data[batches // 2 :],
        time_fn=wall_time(lambda g: partition.build(g, settings).run, data[0]),
        progress=True,
    )
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
        vals = [
            next((r.speedup_vs_eager or 0 for r in rows if r.family == f and r.runner == runner), 0) for f in families
        ]
        ax.bar([i + k * width for i in range(len(families))], vals, width, label=runner)
    ax.set_xticks([i + width * (len(runners) - 1) / 2 for i in range(len(families))], families)
    ax.set_ylabel("speed-up over eager PyTorch")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- low-bit and sparse settings (nnforge bench --lowbit) ---------------------------------------

LOWBIT_FAMILIES = ("bert", "gpt", "vit")
LOWBIT_RUNNERS = ("nnforge-onnxrt", "onnxruntime")  # default; "nnforge-tvm" on request


def lowbit_settings() -> dict:
    """Row name -> nnforge.compile keyword arguments (as examples/lowbit_minilm.py measures them)."""
    from ..passes.lowbit import Quantize
    from ..passes.sparsity import Sparsity

    return {
        "float": {},
        "int8 weight-only": {"quantize": Quantize(weights="int8")},
        "W8A8 dynamic": {"quantize": Quantize(weights="int8", activations="dynamic")},
        "W8A8 per-tensor": {"quantize": Quantize(weights="int8", activations="dynamic_tensor")},
        "int4 GPTQ g128": {"quantize": Quantize(weights="int4", method="gptq", group_size=128)},
        "2:4 Wanda": {"sparsity": Sparsity(method="wanda", pattern="2:4", storage="csr")},
        "heads -25%": {"sparsity": Sparsity(heads=0.25, ratio=0.0)},
    }


@dataclass
class LowbitRow:
    family: str
    setting: str
    runner: str
    median_ms: float | None
    speedup_vs_float: float | None  # this runner's float row / this row
    bundle_bytes: int | None  # the saved bundle (every file), or the .onnx file for ONNX Runtime's own rows
    size_vs_float: float | None
    cosine: float | None  # mean cosine of the outputs' last axis vs eager float
    compile_s: float | None
    note: str = ""


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    b = np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)))


def distinct_layers(model, seed: int = 0) -> None:
    """Re-draw every module's parameters with its own initialiser. ``nn.TransformerEncoder`` deep-copies one
    layer, so the zoo BERT's layers hold identical weights, which the IR stores once: the float bundle
    would look 6x smaller than a real model's, and per-layer quantization (GPTQ) would undo the sharing."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            reset = getattr(m, "_reset_parameters", None) or getattr(m, "reset_parameters", None)
            if callable(reset) and not isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                reset()


def calibration_batches(zm, n: int = 4, seed: int = 1) -> list[tuple]:
    """``n`` batches shaped like the model's example inputs: random floats, random token ids below the
    largest example id; 0/1 masks are kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for x in zm.inputs:
            if x.dtype.is_floating_point:
                batch.append(torch.randn(x.shape, generator=gen))
            elif int(x.max()) <= 1:
                batch.append(x.clone())
            else:
                batch.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype))
        out.append(tuple(batch))
    return out


def _ort_builds(zm) -> list[tuple]:
    """(setting, run, bytes, compile s) for ONNX Runtime on the model exported by torch, float and after its
    own ``quantize_dynamic`` (int8 weights, dynamic uint8 activations); bytes = the .onnx file."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        fdir, qdir = Path(d, "f"), Path(d, "q")
        fdir.mkdir(), qdir.mkdir()
        torch.onnx.export(zm.model, zm.inputs, str(fdir / "model.onnx"), dynamo=True, verbose=False)
        t_float = time.perf_counter() - t0
        quantize_dynamic(
            str(fdir / "model.onnx"),
            str(qdir / "model.onnx"),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        t_quant = time.perf_counter() - t0
        for setting, path, secs in (("float", fdir, t_float), ("quantize_dynamic int8", qdir, t_quant)):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), zm.inputs)}
            out.append((setting, lambda sess=sess, feed=feed: sess.run(None, feed), _dir_bytes(path), secs))
    return out


def _nnforge_build(zm, backend: str, kwargs: dict, batches) -> tuple:
    """(run, bundle bytes, compile s, note) for nnforge.compile with these low-bit/sparse settings."""
    import nnforge

    t0 = time.perf_counter()
    cm = nnforge.compile(
        zm.model,
        zm.inputs,
        target="cpu",
        backend=backend,
        check=False,
        progress=False,
        cache=False,
        calibration=batches if kwargs else None,
        **kwargs,
    )
    secs = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        cm.save(d)
        nbytes = _dir_bytes(Path(d))
    idle = [r.name for r in cm.records if r.lossy and not r.changed]
    arrays = [x.numpy() for x in zm.inputs]
    return (lambda: cm.run(arrays)), nbytes, secs, f"{', '.join(idle)}: nothing changed" if idle else ""


def bench_lowbit_family(
    family: str,
    size: str = "bench",
    repeat: int = 20,
    runners: Sequence[str] | None = None,
    progress=None,
    calibration: int = 4,
    settings: Sequence[str] | None = None,
    rounds: int = 3,
) -> list[LowbitRow]:
    """Latency, bundle size and output cosine of the low-bit/sparse settings (``settings``: names from
    ``lowbit_settings()``, default all) on one family, for nnforge's backends and for ONNX Runtime's own
    ``quantize_dynamic``, in one process. Everything is built first, then timed in ``rounds`` interleaved
    rounds (the best round's median counts), so that load from other processes hits every row alike."""
    import torch

    from ..models import zoo

    zm = zoo.build(family, size, batch=1)
    distinct_layers(zm.model)
    batches = calibration_batches(zm, calibration)
    with torch.no_grad():
        ref = _as_list(zm.model(*zm.inputs))[0]
    built = []  # (setting, runner, run or None, bytes, compile s, note)
    for runner in runners or LOWBIT_RUNNERS:
        if progress:
            progress(f"{family}: building {runner}")
        if runner == "onnxruntime":
            try:
                built += [(setting, runner, fn, nbytes, secs, "") for setting, fn, nbytes, secs in _ort_builds(zm)]
            except Exception as e:  # noqa: BLE001  (reported, not fatal)
                built.append(
                    ("quantize_dynamic int8", runner, None, None, None, f"failed: {type(e).__name__}: {str(e)[:100]}")
                )
            continue
        if not runner.startswith("nnforge-"):
            raise ValueError(f"unknown low-bit runner {runner!r}; choose from nnforge-onnxrt, nnforge-tvm, onnxruntime")
        for setting, kwargs in lowbit_settings().items():
            if settings and setting not in settings and setting != "float":
                continue
            try:
                built.append((setting, runner, *_nnforge_build(zm, runner[len("nnforge-") :], kwargs, batches)))
            except Exception as e:  # noqa: BLE001  (a setting a backend cannot take is reported, not fatal)
                built.append((setting, runner, None, None, None, f"failed: {type(e).__name__}: {str(e)[:100]}"))
    outs = {id(b): _as_list(b[2]())[0] for b in built if b[2] is not None}
    best = time_interleaved({id(b): b[2] for b in built if b[2] is not None}, repeat, rounds, progress, f"{family}: ")
    rows = []
    for b in built:
        setting, runner, _, nbytes, secs, note = b
        ms = best.get(id(b))
        base = next((x for x in built if x[1] == runner and x[0] == "float" and id(x) in best), None)
        rows.append(
            LowbitRow(
                family,
                setting,
                runner,
                ms,
                best[id(base)] / ms if base and ms else None,
                nbytes,
                nbytes / base[3] if base and nbytes else None,
                _mean_cosine(ref, outs[id(b)]) if id(b) in outs else None,
                secs,
                note,
            )
        )
    return rows


def render_lowbit(rows: list[LowbitRow]) -> str:
    cells = [
        (
            r.family,
            r.setting,
            r.runner,
            f"{r.median_ms:.2f}" if r.median_ms else "-",
            f"{r.speedup_vs_float:.2f}x" if r.speedup_vs_float else "-",
            f"{r.bundle_bytes / 1e6:.2f}" if r.bundle_bytes else "-",
            f"{r.size_vs_float:.2f}x" if r.size_vs_float else "-",
            f"{r.cosine:.4f}" if r.cosine is not None else "-",
            f"{r.compile_s:.1f}" if r.compile_s is not None else "-",
            r.note,
        )
        for r in rows
    ]
    return _table_text(
        "nnforge bench --lowbit (median ms; speed-up and size vs the same runner's float row)",
        ("family", "setting", "runner", "median ms", "speed-up", "bundle MB", "size", "cosine", "compile s", "note"),
        ("family", "setting", "runner", "note"),
        cells,
        150,
    )


def run_lowbit(
    families=None,
    size: str = "bench",
    json_path: str | None = None,
    repeat: int = 20,
    runners: Sequence[str] | None = None,
) -> list[LowbitRow]:
    from rich.console import Console

    console = Console(stderr=True)
    rows: list[LowbitRow] = []
    with console.status("bench --lowbit") as status:
        for fam in families or LOWBIT_FAMILIES:
            rows += bench_lowbit_family(fam, size, repeat, runners, progress=lambda m: status.update(f"bench: {m}"))
    print(render_lowbit(rows))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(f"results written to {json_path}")
    return rows


# ---------------------------------------------------------------------------------------
# nnforge bench --sparse: where the TVM CSR kernel beats the dense matmul
# ---------------------------------------------------------------------------------------

SPARSE_DENSITIES = (0.5, 0.3, 0.2, 0.15, 0.1, 0.05)


def bench_sparse_kernel(
    rows: int = 128,
    k: int = 384,
    n: int = 1536,
    densities=SPARSE_DENSITIES,
    repeat: int = 20,
    rounds: int = 3,
    progress=None,
) -> list[dict]:
    """One linear layer ``[rows, k] -> [rows, n]`` (the bench BERT's fc1 at seq 128) with random weights
    at each density, on TVM: the dense matmul schedule vs the CSR kernel (tvm_sparse), timed in
    interleaved rounds. ``used`` says which one nnforge picks (tvm_sparse.MAX_DENSITY)."""
    from ..backends import tvm as tvm_backend
    from ..backends import tvm_sparse
    from ..ir.graph import Graph, TensorType
    from ..ops.lowbit import csr_from_dense

    rng = np.random.default_rng(0)
    x = [rng.standard_normal((1, rows, k)).astype(np.float32)]

    def build(w, sparse: bool):
        g = Graph("layer")
        xv = g.add_input("x", TensorType((1, rows, k)))
        g.outputs = [
            g.op("sparse_linear", xv, *[g.add_constant(a) for a in csr_from_dense(w)], in_features=k)
            if sparse
            else g.op("linear", xv, g.add_constant(w))
        ]
        art = tvm_backend.build(g, "cpu")
        return lambda: art.run(x)

    saved, built = tvm_sparse.MAX_DENSITY, {}
    tvm_sparse.MAX_DENSITY = 1.0  # build the CSR kernel at every density
    try:
        for d in densities:
            if progress:
                progress(f"building density {d}")
            w = np.where(rng.random((n, k)) < d, rng.standard_normal((n, k)), 0).astype(np.float32)
            built[d, "dense"], built[d, "csr"] = build(w, False), build(w, True)
    finally:
        tvm_sparse.MAX_DENSITY = saved
    best = time_interleaved(built, repeat, rounds, progress)
    return [
        {
            "density": d,
            "dense_ms": best[d, "dense"],
            "csr_ms": best[d, "csr"],
            "speedup": best[d, "dense"] / best[d, "csr"],
            "used": "csr" if d <= saved else "dense",
        }
        for d in densities
    ]


def run_sparse(json_path: str | None = None, repeat: int = 20) -> list[dict]:
    from rich.console import Console

    with Console(stderr=True).status("bench --sparse") as status:
        rows = bench_sparse_kernel(repeat=repeat, progress=lambda m: status.update(f"bench --sparse: {m}"))
    cells = [
        (f"{r['density']:.2f}", f"{r['dense_ms']:.3f}", f"{r['csr_ms']:.3f}", f"{r['speedup']:.2f}x", r["used"])
        for r in rows
    ]
    print(
        _table_text(
            "nnforge bench --sparse (TVM, one 128 x 384 -> 1536 linear, median ms)",
            ("density", "dense ms", "CSR ms", "CSR speed-up", "nnforge uses"),
            ("nnforge uses",),
            cells,
            100,
        )
    )
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=1))
        print(f"results written to {json_path}")
    return rows
