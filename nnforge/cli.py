"""The ``nnforge`` command line: show, compile, tune, run, bench, check, explain, cache, passes."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import NnforgeError


def _cmd_show(args) -> int:
    from .api import import_model
    from .ir.printer import format_graph, summary

    graph = import_model(args.model)
    if args.blocks:
        from .passes.blocks import find_blocks, format_blocks, prepare

        print(format_blocks(find_blocks(prepare(graph))))
        return 0
    print(format_graph(graph, constants=args.constants))
    print(summary(graph))
    return 0


def _cmd_compile(args) -> int:
    from .api import compile as nf_compile

    compiled = nf_compile(
        args.model,
        target=args.target,
        pipeline=args.pipeline,
        backend=args.backend,
        check=not args.no_check,
        fallback=not args.no_fallback,
    )
    compiled.save(args.output)
    print(compiled.report())
    print(f"bundle written to {args.output}")
    return 0


def _cmd_tune(args) -> int:
    from .api import compile as nf_compile

    options = {"tune_db": args.db} if args.db else {}
    target = args.target or "cpu"
    if args.rpc or args.key:  # measured on a TVM RPC tracker's devices, built here for the key's target
        from .backends.tvm_rpc import target_of_key

        options.update(tune_rpc=args.rpc, tune_key=args.key)
        target = args.target or target_of_key(args.key or "")
    compiled = nf_compile(
        args.model,
        target=target,
        backend="tvm",
        pipeline=args.pipeline,
        tune=args.trials,
        options=options,
        check=not args.no_check,
        cache=False,
    )
    compiled.save(args.output)
    print(compiled.report())
    print(f"bundle written to {args.output}")
    return 0


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)  # never unpickle user files
    except (OSError, ValueError) as e:
        raise NnforgeError(f"cannot read input {path}: {e}") from None


def _cmd_run(args) -> int:
    from .api import load

    compiled = load(args.bundle)
    outs = compiled.run([_load_npy(p) for p in args.input])
    if args.output:
        if len(args.output) != len(outs):
            raise NnforgeError(
                f"the model has {len(outs)} output(s) but {len(args.output)} --output path(s) were given"
            )
        for path, arr in zip(args.output, outs):
            np.save(path, arr)
    for v, arr in zip(compiled.graph.outputs, outs):
        print(f"{v.name}: {arr.dtype}{list(arr.shape)}  mean={float(np.mean(arr)) if arr.size else 0:.6g}")
    return 0


DEFAULT_BENCH_JSON = "bench/results/bench.json"


def _cmd_bench(args) -> int:
    from .bench.harness import run_bench

    if args.ray and not args.zoo:
        raise NnforgeError("--ray fans out the zoo bench: use it with --zoo")
    if args.pareto:
        from .bench.harness import run_pareto

        run_pareto(args.pareto, size=args.size)
        return 0
    if args.sparse:
        from .bench.harness import run_sparse

        run_sparse(args.json if args.json != DEFAULT_BENCH_JSON else "bench/results/sparse.json", repeat=args.repeat)
        return 0
    if args.llm:
        from .bench.llm import ROWS, run_llm

        json_path = args.json if args.json != DEFAULT_BENCH_JSON else "bench/results/llm.json"
        run_llm([r for r in ROWS if not args.runner or any(k in r for k in args.runner)], json_path=json_path)
        return 0
    if args.diffusion:
        from .bench.diffusion import DEFAULT_JSON, run_diffusion

        json_path = args.json if args.json != DEFAULT_BENCH_JSON else DEFAULT_JSON
        run_diffusion(args.model or ("digits", "unet2d_condition", "dit"), json_path=json_path, steps=args.steps)
        return 0
    if args.zoo:
        from .bench.harness import run_zoo

        json_path = args.json if args.json != DEFAULT_BENCH_JSON else "bench/results/zoo.json"
        run_zoo(
            args.model or None,
            size=args.size,
            json_path=json_path,
            repeat=args.repeat,
            runners=args.runner,
            executor=args.ray,
        )
        return 0
    if args.lowbit:
        from .bench.harness import run_lowbit

        json_path = args.json if args.json != DEFAULT_BENCH_JSON else "bench/results/lowbit.json"
        run_lowbit(
            families=args.family or None, size=args.size, json_path=json_path, repeat=args.repeat, runners=args.runner
        )
        return 0
    run_bench(
        families=args.family or None,
        size=args.size,
        json_path=args.json,
        repeat=args.repeat,
        runners=args.runner,
        plot=args.plot,
        tune=args.tune,
    )
    return 0


def _cmd_generate(args) -> int:
    from .api import load
    from .llm import CompiledLM

    lm = load(args.bundle)
    if not isinstance(lm, CompiledLM):
        raise NnforgeError(f"{args.bundle} is not a compile_lm bundle")
    if lm.tokenizer is None:
        raise NnforgeError(f"{args.bundle} carries no tokenizer (tokenizer.json)")
    shown = []

    def stream(tokens):  # print the text as it grows
        shown.extend(tokens)
        text = lm.decode(shown)
        print(text[len(stream.printed) :], end="", flush=True)
        stream.printed = text

    stream.printed = ""
    lm.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat=not args.raw,
        on_token=stream,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print()
    return 0


def _cmd_check(args) -> int:
    from .check import check

    inputs = [_load_npy(p) for p in args.input] or None
    report = check(args.model, inputs, targets=args.target or ["cpu"], pipeline=args.pipeline)
    print(report)
    return 0 if report.ok else 1


def _cmd_explain(args) -> int:
    from .explain import explain

    explain(
        args.model, target=args.target, backend=args.backend, pipeline=args.pipeline, min_block_size=args.min_block_size
    )
    return 0


def _cmd_cache(args) -> int:
    from . import cache

    if args.action == "clear":
        print(f"removed {cache.clear()} entr(ies) from {cache.cache_dir()}")
    else:
        print(cache.info())
    return 0


def _cmd_passes(args) -> int:
    from .passes.manager import PASSES, PIPELINES, resolve_pipeline

    resolve_pipeline("O0")  # loads the built-in passes
    for name, cls in sorted(PASSES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:22s} {'lossy' if cls.lossy else 'lossless':8s} {doc}")
    for name, passes in PIPELINES.items():
        print(f"pipeline {name}: {' -> '.join(passes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnforge", description="Compile PyTorch/ONNX models for cpu, cuda, arm and wasm.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("show", help="print a model's IR")
    s.add_argument("model", help="an .onnx file")
    s.add_argument("--constants", action="store_true", help="list the constants too")
    s.add_argument("--blocks", action="store_true", help="print the transformer blocks found (after lossless fusion)")
    s.set_defaults(func=_cmd_show)

    c = sub.add_parser("compile", help="compile an ONNX file into a bundle")
    c.add_argument("model")
    c.add_argument("--target", default="cpu")
    c.add_argument("--backend", default=None)
    c.add_argument("--pipeline", default="O2")
    c.add_argument("--no-check", action="store_true", help="skip the per-pass numerics check")
    c.add_argument("--no-fallback", action="store_true", help="refuse ops the backend cannot take (no torch fallback)")
    c.add_argument("-o", "--output", required=True, help="bundle directory")
    c.set_defaults(func=_cmd_compile)

    t = sub.add_parser(
        "tune", help="compile an ONNX file with TVM, tuning its kernels with MetaSchedule (here, or on an RPC farm)"
    )
    t.add_argument("model")
    t.add_argument("--trials", type=int, required=True, help="MetaSchedule trials in all (e.g. 64 per kernel)")
    t.add_argument(
        "--db", default=None, help="tuning database directory (default $NNFORGE_TUNE_DB or ~/.cache/nnforge/tuning)"
    )
    t.add_argument(
        "--rpc", default=None, metavar="HOST:PORT", help="measure on the devices of this TVM RPC tracker (with --key)"
    )
    t.add_argument("--key", default=None, help="the key the devices registered under with the tracker")
    t.add_argument(
        "--target", default=None, help="cpu or arm (default: cpu; with --key, arm for keys like aarch64-*, arm-*)"
    )
    t.add_argument("--pipeline", default="O2")
    t.add_argument("--no-check", action="store_true", help="skip the per-pass numerics check")
    t.add_argument("-o", "--output", required=True, help="bundle directory")
    t.set_defaults(func=_cmd_tune)

    r = sub.add_parser("run", help="run a bundle on .npy inputs")
    r.add_argument("bundle")
    r.add_argument("--input", action="append", default=[], help=".npy file, once per model input, in order")
    r.add_argument("--output", action="append", default=[], help=".npy file, once per model output")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("bench", help="benchmark the model families against eager, torch.compile and ONNX Runtime")
    b.add_argument("--family", action="append", help="mlp, cnn, vit, bert, gpt (repeatable; default all)")
    b.add_argument("--size", default="bench", choices=["tiny", "bench"])
    b.add_argument("--repeat", type=int, default=20)
    b.add_argument("--json", default=DEFAULT_BENCH_JSON)
    b.add_argument(
        "--runner",
        action="append",
        help="only these runners (besides eager): torch.compile, onnxruntime, tvm direct, nnforge-onnxrt, nnforge-tvm",
    )
    b.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="TRIALS",
        help="also run nnforge-tvm tuned with this many MetaSchedule trials per model",
    )
    b.add_argument(
        "--plot",
        nargs="?",
        const="bench/results/bench.png",
        default=None,
        metavar="PNG",
        help="also save a bar chart of the speed-ups",
    )
    b.add_argument(
        "--pareto",
        nargs="?",
        const="bench/results/pareto.png",
        default=None,
        metavar="PNG",
        help="instead: search token merging/pruning/layer skipping on the ViT and plot speed vs quality",
    )
    b.add_argument(
        "--lowbit",
        action="store_true",
        help="instead: float / int8 / W8A8 / int4 GPTQ / 2:4 / head pruning on bert, gpt, vit (latency, "
        "bundle size, cosine) beside ONNX Runtime's quantize_dynamic; runners nnforge-onnxrt, nnforge-tvm, "
        "onnxruntime (default: nnforge-onnxrt and onnxruntime); JSON to bench/results/lowbit.json",
    )
    b.add_argument(
        "--sparse",
        action="store_true",
        help="instead: the TVM CSR sparse kernel vs the dense matmul on one linear layer at densities "
        "0.5..0.05, and which one nnforge uses; JSON to bench/results/sparse.json",
    )
    b.add_argument(
        "--zoo",
        action="store_true",
        help="instead: the real architectures of nnforge.models.real (timm, transformers, diffusers, random "
        "weights) through eager, torch.compile, ONNX Runtime, nnforge-onnxrt and nnforge-tvm; JSON to "
        "bench/results/zoo.json",
    )
    b.add_argument(
        "--llm",
        action="store_true",
        help="instead: LLM decoding on SmolLM2-135M (prefill, decode tok/s, memory, perplexity, greedy agreement): "
        "Hugging Face eager, onnxruntime-genai fp32/int4, nnforge float/int8/int4, speculative; --runner filters "
        "rows by substring; JSON to bench/results/llm.json",
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const="ray",
        default=None,
        metavar="ADDRESS",
        help="with --zoo: one Ray task per model (on the cluster at ADDRESS, $RAY_ADDRESS, or a local one)",
    )
    b.add_argument(
        "--diffusion",
        action="store_true",
        help="instead: step caching (DeepCache, FORA, T-Gate) on DDIM sampling runs at batch 1 and 8: speed-up over "
        "uncached nnforge, PSNR/SSIM and classifier agreement on the digits model (--model digits, "
        "unet2d_condition, dit); JSON to bench/results/diffusion.json",
    )
    b.add_argument("--steps", type=int, default=50, help="with --diffusion: sampling steps per run")
    b.add_argument("--model", action="append", help="with --zoo/--diffusion: only these models (repeatable)")
    b.set_defaults(func=_cmd_bench)

    gn = sub.add_parser("generate", help="generate text with a compile_lm bundle that carries a tokenizer")
    gn.add_argument("bundle", help="a directory written by CompiledLM.save")
    gn.add_argument("--prompt", required=True)
    gn.add_argument("--max-new-tokens", type=int, default=64)
    gn.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gn.add_argument("--top-k", type=int, default=0)
    gn.add_argument("--top-p", type=float, default=1.0)
    gn.add_argument("--seed", type=int, default=None)
    gn.add_argument("--raw", action="store_true", help="the prompt as is (default: wrapped in the chat template)")
    gn.set_defaults(func=_cmd_generate)

    k = sub.add_parser("check", help="run eager/interpreter/every backend on the same inputs and compare")
    k.add_argument("model", help="an .onnx file")
    k.add_argument("--input", action="append", default=[], help=".npy file per model input (default: random)")
    k.add_argument("--target", action="append", help="cpu, cuda, arm, wasm (repeatable; default cpu)")
    k.add_argument("--pipeline", default="O2")
    k.set_defaults(func=_cmd_check)

    e = sub.add_parser("explain", help="dry run: which backend takes each op, the partition plan, what falls back")
    e.add_argument("model", help="an .onnx file")
    e.add_argument("--target", default="cpu")
    e.add_argument("--backend", default=None)
    e.add_argument("--pipeline", default="O2")
    e.add_argument("--min-block-size", type=int, default=3, help="smaller backend partitions stay on torch")
    e.set_defaults(func=_cmd_explain)

    ca = sub.add_parser("cache", help="the compile cache: info (where, entries, size) or clear")
    ca.add_argument("action", choices=["info", "clear"])
    ca.set_defaults(func=_cmd_cache)

    ps = sub.add_parser("passes", help="list passes and pipelines")
    ps.set_defaults(func=_cmd_passes)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (NnforgeError, ValueError) as e:
        print(f"nnforge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
