"""The CUDA bench and check: nnforge's TVM CUDA builds of the zoo families against eager PyTorch and
torch.compile on the same GPU (and ONNX Runtime's CUDA provider when installed), in one run.

    python -m nnforge.bench.cuda build DIR [--size tiny|bench] [--arch sm_90]   # anywhere (no GPU needed)
    python -m nnforge.bench.cuda run DIR [--json out.json]                      # on the GPU machine

``build`` compiles each family for target ``cuda`` and saves the bundle plus the example inputs and
eager PyTorch's outputs (``io.npz``: numpy, never pickle). ``run`` loads each bundle (the TVM runtime
alone is enough: see backends/tvm_artifact.py), checks its outputs against those saved and against
eager PyTorch on the GPU, then times, interleaved: nnforge with inputs already on the GPU (the kernels),
nnforge called with numpy arrays (copies in and out included), eager PyTorch and torch.compile on the
GPU. Ratios are the others' time over nnforge's on-GPU time (> 1: nnforge is faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

FAMILIES = ("mlp", "cnn", "vit", "bert", "gpt")


def _say(msg: str) -> None:
    print(f"[cuda bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(out: Path, families=FAMILIES, size: str = "bench", batch: int = 8, arch: str = "sm_90") -> list[str]:
    """Compile every family for CUDA into ``out/<family>``; save inputs and eager outputs in ``io.npz``.
    Returns the families that failed (each failure is reported; the others still build)."""
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for family in families:
        try:
            _build_one(out / family, family, size, batch, arch)
        except Exception as e:  # one family failing (e.g. torch.export on another torch) must not stop the rest
            failed.append(family)
            _say(f"{family}: FAILED to build: {type(e).__name__}: {str(e)[:1500]}")
    return failed


def _build_one(d: Path, family: str, size: str, batch: int, arch: str) -> None:
    import torch

    import nnforge
    from nnforge.models import zoo

    _say(f"building {family} ({size}, batch {batch}) for cuda {arch}")
    zm = zoo.build(family, size, batch=batch)
    t0 = time.perf_counter()
    cm = nnforge.compile(
        zm.model,
        zm.inputs,
        target="cuda",
        backend="tvm",
        dynamic_shapes=zm.dynamic_shapes,
        input_names=zm.input_names,
        check=False,
        progress=False,
        options={"arch": arch},
    )
    cm.save(d)
    with torch.no_grad():
        ref = zm.model(*zm.inputs)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    arrays = {f"in{i}": x.numpy() for i, x in enumerate(zm.inputs)}
    arrays.update({f"out{i}": r.numpy() for i, r in enumerate(refs)})
    np.savez(d / "io.npz", **arrays)
    (d / "bench.json").write_text(json.dumps({"family": family, "size": size, "batch": batch}))
    _say(f"{family}: built in {time.perf_counter() - t0:.1f} s")


def _synced(fn, xs):
    """A zero-argument call of ``fn(*xs)`` on the GPU that waits for the GPU to finish."""
    import torch

    def call():
        with torch.no_grad():
            fn(*xs)
        torch.cuda.synchronize()

    return call


def _rel_error(ref, got) -> float:
    from nnforge.passes.manager import max_rel_error

    return max_rel_error([np.asarray(r) for r in ref], [np.asarray(g) for g in got])


def run(bundles: Path, repeat: int = 50, json_path: str | None = None) -> list[dict]:
    """Check and time every bundle under ``bundles`` on the GPU."""
    import torch

    import nnforge
    from nnforge.bench.harness import time_interleaved
    from nnforge.models import zoo

    if not torch.cuda.is_available():
        raise SystemExit("run needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    torch.backends.cudnn.allow_tf32 = False
    gpu = torch.cuda.get_device_name(0)
    _say(f"GPU: {gpu}, torch {torch.__version__}")
    rows = []
    for d in sorted(p for p in bundles.iterdir() if (p / "manifest.json").is_file()):
        family = d.name
        io = np.load(d / "io.npz")
        inputs = [io[k] for k in sorted((k for k in io.files if k.startswith("in")), key=lambda k: int(k[2:]))]
        saved = [io[k] for k in sorted((k for k in io.files if k.startswith("out")), key=lambda k: int(k[3:]))]
        row = {"family": family, "gpu": gpu}
        try:
            cm = nnforge.load(d)
            got = cm.artifact.run(inputs)
            row["max_rel_error_vs_saved"] = _rel_error(saved, got)
            settings = json.loads((d / "bench.json").read_text())
            zm = zoo.build(settings["family"], settings["size"], batch=settings["batch"])  # same seed, same weights
            model = zm.model.cuda().eval()
            xs = [torch.from_numpy(a).cuda() for a in inputs]
            with torch.no_grad():
                eager_out = model(*xs)
            eager_out = [
                o.float().cpu().numpy() for o in (eager_out if isinstance(eager_out, (tuple, list)) else (eager_out,))
            ]
            row["max_rel_error_vs_gpu_eager"] = _rel_error(eager_out, got)
            on_gpu = cm.artifact.device_runner(inputs)
            fns = {
                "nnforge_gpu": on_gpu,
                "nnforge_numpy": lambda cm=cm, inputs=inputs: cm.artifact.run(inputs),
                "eager": _synced(model, xs),
                "torch_compile": _synced(torch.compile(model), xs),
            }
            fns["torch_compile"]()  # compile outside the timing
            ms = time_interleaved(fns, repeat, rounds=3)
            row.update({f"{k}_ms": v for k, v in ms.items()})
            row.update({f"{k}_over_nnforge": v / ms["nnforge_gpu"] for k, v in ms.items() if k != "nnforge_gpu"})
            _say(
                f"{family}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                + f"; error vs saved {row['max_rel_error_vs_saved']:.2e}, vs GPU eager {row['max_rel_error_vs_gpu_eager']:.2e}"
            )
        except Exception as e:  # one family failing must not hide the others' results
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            _say(f"{family}: FAILED {row['error']}")
        rows.append(row)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnforge.bench.cuda", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the zoo families for CUDA and save bundles")
    b.add_argument("dir")
    b.add_argument("--size", default="bench", choices=["tiny", "bench"])
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--arch", default="sm_90", help="CUDA architecture (H100/H200: sm_90)")
    b.add_argument("--family", action="append", choices=FAMILIES)
    r = sub.add_parser("run", help="check and time the saved bundles on this machine's GPU")
    r.add_argument("dir")
    r.add_argument("--repeat", type=int, default=50)
    r.add_argument("--json")
    args = p.parse_args(argv)
    if args.cmd == "build":
        return 1 if build(Path(args.dir), args.family or FAMILIES, args.size, args.batch, args.arch) else 0
    rows = run(Path(args.dir), args.repeat, args.json)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
