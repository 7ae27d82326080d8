"""``nnforge bench --llm``: LLM decoding on the real SmolLM2-135M-Instruct, side by side in one run.

Rows: Hugging Face eager ``generate`` (its dynamic cache), onnxruntime-genai (its model builder, fp32 and
int4, CPU), and nnforge (compile_lm) float / int8 / int4 on ONNX Runtime and on TVM (there also with an
int8 KV cache, ``-kv8``), then nnforge's self-speculative decoding and KV-cache policies. Each row runs in
its own process (one runtime's thread pool cannot slow the next, and its peak memory is its own) with the
same thread count.

Measured per row: prefill ms for a 128- and a 512-token prompt (median of 3), decode tokens/s at batch 1
(128 new tokens forced after the 128-token prompt; new tokens after the first over the time after the
prefill), the weights' and KV cache's MB, perplexity on a fixed held-out text, and how many of the first
64 greedy tokens equal Hugging Face float's. Text comes from Python's own documentation
(``pydoc_data.topics``), so the run needs no download. Nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NEW_TOKENS = 128
WARMUP_TOKENS = 4  # decode steps run once before the timed run, by every runner alike (first-run costs)
MATCH_TOKENS = 64
ROWS = (
    "hf-eager",
    "genai-fp32",
    "genai-int4",
    "nnforge-onnxrt-float",
    "nnforge-onnxrt-int8",
    "nnforge-onnxrt-int4",
    "nnforge-onnxrt-int4intzero",
    "nnforge-tvm-float",
    "nnforge-tvm-int8",
    "nnforge-tvm-int4",
    "nnforge-tvm-float-kv8",
    "nnforge-tvm-int4-kv8",
    "nnforge-onnxrt-float-speculative",
    "nnforge-onnxrt-float-prune50",
    "nnforge-onnxrt-float-streaming50",
    "nnforge-onnxrt-float-h2o50",
    "nnforge-onnxrt-float-snapkv50",
    "nnforge-onnxrt-float-streaming25",
    "nnforge-onnxrt-float-h2o25",
    "nnforge-onnxrt-float-snapkv25",
)
FULL_CACHE = 128 + NEW_TOKENS  # slots the decode run fills without compression


def corpus_ids(tokenizer, n: int = 1400) -> list[int]:
    """The first ``n`` tokens of a fixed English text from Python's documentation."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in ("assignment", "if", "while", "for", "try", "with", "function", "class"))
    ids = tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise RuntimeError(f"bench text has only {len(ids)} tokens")
    return list(ids[:n])


def texts(tokenizer) -> dict:
    ids = corpus_ids(tokenizer)
    return {"prompt128": ids[:128], "prompt512": ids[:512], "heldout": ids[1000:1400]}


def _median_ms(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _mb(nbytes: int) -> float:
    return round(nbytes / 1e6, 1)


# -- rows -------------------------------------------------------------------------------------------------


def _hf_row(model, t: dict) -> dict:
    import copy

    import torch

    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id, cfg.do_sample, cfg.max_new_tokens = None, False, NEW_TOKENS
    cfg.temperature = cfg.top_p = cfg.top_k = None

    def forward(ids):
        with torch.no_grad():
            model(torch.tensor([ids]), use_cache=True)

    row = {
        "prefill128_ms": _median_ms(lambda: forward(t["prompt128"])),
        "prefill512_ms": _median_ms(lambda: forward(t["prompt512"])),
    }
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(torch.tensor([t["prompt128"]]), generation_config=cfg)
        total = time.perf_counter() - start
        logits = model(torch.tensor([t["heldout"]])).logits[0].double()
    tokens = out[0, 128:].tolist()
    row["decode_tok_s"] = (len(tokens) - 1) / max(total - row["prefill128_ms"] / 1e3, 1e-9)
    row["tokens"] = tokens
    nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(len(t["heldout"]) - 1), torch.tensor(t["heldout"][1:])]
    row["perplexity"] = float(torch.exp(nll.mean()))
    row["weights_mb"] = _mb(sum(p.numel() * p.element_size() for p in model.parameters()))
    kv = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    row["kv_mb"] = _mb(kv * (128 + NEW_TOKENS))  # the dynamic cache grows with the sequence
    return row


def genai_model(kind: str, threads: int) -> Path:
    """onnxruntime-genai's build of SmolLM2 (made once under the cache dir, ~1 min), set to ``threads``."""
    from ..cache import cache_dir
    from ..models.smollm import smollm2_folder

    out = cache_dir() / "models" / f"smollm2-genai-{kind}"
    if not (out / "genai_config.json").exists():
        script = (
            "import runpy, sys; from nnforge.models.real import ensure_torchvision; ensure_torchvision(); "
            "sys.argv = ['builder'] + sys.argv[1:]; "
            "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
        )
        cmd = [sys.executable, "-c", script, "-i", str(smollm2_folder()), "-o", str(out), "-p", kind, "-e", "cpu"]
        subprocess.run(cmd + ["-c", str(out.with_name(out.name + "-cache"))], check=True, capture_output=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _genai_row(kind: str, t: dict, threads: int) -> dict:
    import onnxruntime_genai as og

    folder = genai_model(kind, threads)
    model = og.Model(str(folder))

    def run(ids, new):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - start
        while not gen.is_done():
            gen.generate_next_token()
        return gen, prefill, time.perf_counter() - start

    row = {
        "prefill128_ms": _median_ms(lambda: run(t["prompt128"], 1)),
        "prefill512_ms": _median_ms(lambda: run(t["prompt512"], 1)),
    }
    run(t["prompt128"], WARMUP_TOKENS)
    gen, prefill, total = run(t["prompt128"], NEW_TOKENS)
    tokens = list(gen.get_sequence(0))[128:]
    row["decode_tok_s"] = (len(tokens) - 1) / (total - prefill)
    row["tokens"] = tokens
    row["weights_mb"] = _mb(sum(f.stat().st_size for f in folder.glob("model.onnx*")))
    row["kv_mb"] = None
    return row


def _nnforge_row(name: str, model, tokenizer, t: dict, threads: int) -> dict:
    import nnforge
    from nnforge.llm.speculative import least_influential, speculative_generate

    parts = name.split("-")
    backend, precision, extra = parts[1], parts[2], parts[3] if len(parts) > 3 else ""
    speculative = extra == "speculative"
    from nnforge.llm.budget import QUANTIZE

    quantize = QUANTIZE["int4-intzero" if precision == "int4intzero" else precision]
    kv = prune = None
    kv_dtype = "int8" if extra == "kv8" else "float32"  # an int8 KV cache (TVM)
    if extra.startswith("prune"):  # prefill token pruning keeping that percent of long prompts
        prune = nnforge.PromptPrune(keep=int(extra[5:]) / 100)
    elif extra and not speculative and extra != "kv8":  # a KV policy and its budget in percent of the full cache
        policy, percent = extra.rstrip("0123456789"), int(extra[len(extra.rstrip("0123456789")) :])
        kv = nnforge.KVCompress(policy, budget=FULL_CACHE * percent // 100)
    start = time.perf_counter()
    lm = nnforge.compile_lm(
        model,
        max_length=640,
        backend=backend,
        quantize=quantize,
        threads=threads,
        kv=kv,
        prune=prune,
        kv_dtype=kv_dtype,
    )
    row = {"compile_s": round(time.perf_counter() - start, 1)}
    cache_bytes = lm.new_cache(1, kv.budget if kv else FULL_CACHE).nbytes()  # the slots the decode run holds

    def prefill(ids):
        lm.generate(ids, max_new_tokens=1, stop_tokens=())

    row["prefill128_ms"] = _median_ms(lambda: prefill(t["prompt128"]))
    row["prefill512_ms"] = _median_ms(lambda: prefill(t["prompt512"]))
    if speculative:
        skip = least_influential(lm, t["prompt128"], 4)
        lm.set_options(spinning=False)  # three sessions take turns: idle ones must not spin
        lm.runner("all"), lm.runner("last", skip, "int8")  # build before timing
        plain = lm.generate(t["prompt128"], max_new_tokens=NEW_TOKENS, stop_tokens=())
        spec = speculative_generate(lm, t["prompt128"], NEW_TOKENS, skip, k=3, quantize="int8")
        row["tokens"] = spec.tokens
        row["decode_tok_s"] = spec.decode_tokens_per_second
        row["note"] = (
            f"int8 draft skipping {len(skip)} of {lm.info['num_layers']} layers, k=3: acceptance "
            f"{spec.acceptance_rate:.0%}, "
            f"decode {spec.decode_tokens_per_second / plain.decode_tokens_per_second:.2f}x its own greedy decode; "
            f"tokens equal to greedy: {spec.tokens == plain.tokens[0]}"
        )
    else:
        lm.generate(t["prompt128"], max_new_tokens=WARMUP_TOKENS, stop_tokens=())
        gen = lm.generate(t["prompt128"], max_new_tokens=NEW_TOKENS, stop_tokens=())
        row["tokens"] = gen.tokens[0]
        row["decode_tok_s"] = gen.decode_tokens_per_second
    row["perplexity"] = lm.perplexity(t["heldout"])
    row["weights_mb"] = _mb(sum(a.nbytes for a in lm.graph.constants.values()))
    row["kv_mb"] = _mb(cache_bytes)
    return row


def run_row(name: str, threads: int) -> dict:
    """One row, in this process."""
    import torch

    from ..models.smollm import smollm2

    torch.set_num_threads(threads)
    model, tokenizer = smollm2()
    t = texts(tokenizer)
    if name == "hf-eager":
        row = _hf_row(model, t)
    elif name.startswith("genai-"):
        del model
        row = _genai_row(name.split("-")[1], t, threads)
    elif name.startswith("nnforge-"):
        row = _nnforge_row(name, model, tokenizer, t, threads)
    else:
        raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1)
    return {"row": name, **row}


def run_llm(rows=None, threads: int = 2, json_path: str | None = "bench/results/llm.json") -> list[dict]:
    """Every row in its own process, then one table (greedy agreement against the hf-eager row)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    rows = list(rows or ROWS)
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads)}
    with Progress(transient=True) as progress:
        task = progress.add_task("LLM bench", total=len(rows))
        for name in rows:
            progress.update(task, description=f"LLM bench: {name}")
            proc = subprocess.run(
                [sys.executable, "-m", "nnforge.bench.llm", "--row", name, "--threads", str(threads)],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                results.append({"row": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]})
            else:
                results.append(json.loads(lines[-1]))
            progress.advance(task)
    ref = next((r.get("tokens") for r in results if r["row"] == "hf-eager"), None)
    for r in results:
        if ref is not None and r.get("tokens"):
            same = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), MATCH_TOKENS)
            r["greedy_match"] = min(same, MATCH_TOKENS)
    table = Table(title=f"SmolLM2-135M-Instruct, batch 1, {threads} threads, {NEW_TOKENS} new tokens")
    for col in ("runner", "prefill 128", "prefill 512", "decode tok/s", "weights MB", "KV MB", "ppl", "greedy = HF"):
        table.add_column(col, justify="left" if col == "runner" else "right")

    def fmt(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)

    for r in results:
        if "error" in r:
            table.add_row(r["row"], f"[red]{r['error']}", *[""] * 6)
            continue
        table.add_row(
            r["row"],
            fmt(r.get("prefill128_ms"), "{:.0f} ms"),
            fmt(r.get("prefill512_ms"), "{:.0f} ms"),
            fmt(r.get("decode_tok_s")),
            fmt(r.get("weights_mb"), "{:.0f}"),
            fmt(r.get("kv_mb")),
            fmt(r.get("perplexity"), "{:.2f}"),
            fmt(r.get("greedy_match"), "{}/" + str(MATCH_TOKENS)),
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for r in results:
        if r.get("note"):
            console.print(f"{r['row']}: {r['note']}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=1))
    return results


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table (docs/llm.md)."""
    head = "| runner | prefill 128 ms | prefill 512 ms | decode tok/s | weights MB | KV MB | perplexity | greedy = HF |"
    lines = [head, "|---|" + "---:|" * 7]

    def f(v, spec="{:.1f}"):
        return "-" if v is None else spec.format(v)

    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} |" + " |" * 6)
            continue
        lines.append(
            f"| {r['row']} | {f(r.get('prefill128_ms'), '{:.0f}')} | {f(r.get('prefill512_ms'), '{:.0f}')} | "
            f"{f(r.get('decode_tok_s'))} | {f(r.get('weights_mb'), '{:.0f}')} | {f(r.get('kv_mb'))} | "
            f"{f(r.get('perplexity'), '{:.2f}')} | {f(r.get('greedy_match'), '{}/' + str(MATCH_TOKENS))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nnforge.bench.llm")
    p.add_argument("--row", help="run one row in this process and print its JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", metavar="JSON", help="print a results file as a Markdown table")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
    elif args.row:
        print(json.dumps(run_row(args.row, args.threads), default=lambda x: np.asarray(x).tolist()))
    else:
        run_llm(threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
