"""``compile_lm``: a causal LM as a compiled decoder step with a KV cache, and ``CompiledLM`` to run it.

    lm = nnforge.compile_lm(model, max_length=512, backend="onnxrt", quantize="int4", tokenizer=tok)
    lm.generate("What is the capital of France?", max_new_tokens=32, chat=True).text
    lm.perplexity(ids); lm.save("bundle"); nnforge.load("bundle").generate(...)

The step graph is built with logits for every position (what perplexity and speculative verification
read), the low-bit passes run on it once, and the generation variant (logits of the last row only)
and layer-skipped drafts are cut from the same optimized graph, so they share its weights' math.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import NnforgeError
from ..ir import Graph
from ..ir.shapes import specialize
from ..passes.lowbit.settings import Quantize
from ..targets import get_target
from .build import build_step
from .generate import Generation, PlainDecoder, Sampling, as_batch, generate
from .kv import CompressedDecoder, KVCompress, PromptPrune, PrunedDecoder
from .runtime import KVCache, StepRunner
from .spec import DecoderSpec, read_decoder
from .surgery import all_rows, int8_cache, last_rows, skip_layers, with_attention_mass

DECODE_DIR = "decode"  # a TVM bundle's one-token step
DECODE_SHAPE = {"seq": 1, "batch": 1}  # what TVM's second build of the step is specialized to


@dataclass
class Text(Generation):
    text: list[str] | None = None


def _quantize_settings(quantize) -> Quantize | None:
    if quantize is None or isinstance(quantize, Quantize):
        return quantize
    if quantize == "int8":  # weight-only, per output channel; the embedding too
        return Quantize(weights="int8", embeddings="int8")
    if quantize == "int4":  # groups of 32 with float zero points (as GGUF's Q4_1), the embedding in int8
        return Quantize(weights="int4", group_size=32, embeddings="int8", zero_point="float")
    raise NnforgeError(f"compile_lm: quantize must be None, 'int8', 'int4' or a nnforge.Quantize, got {quantize!r}")


def prefill_batches(ids_list: Sequence[Sequence[int]], graph: Graph) -> list[list[np.ndarray]]:
    """Graph inputs for prefilling each token sequence into an empty cache (calibration for GPTQ)."""
    out = []
    for ids in ids_list:
        ids = np.asarray(ids, np.int64)[None]
        s = ids.shape[1]
        feed = {
            "input_ids": ids,
            "seqlens_k": np.array([s - 1], np.int32),
            "total_len": np.array(s, np.int32),
            "position_ids": np.arange(s)[None],
            "last_index": np.array([s - 1]),
        }
        out.append(
            [
                feed[v.name] if v.name in feed else np.zeros((1, v.shape[1], s, v.shape[3]), np.float32)
                for v in graph.inputs
            ]
        )
    return out


def int8_compute(graph: Graph) -> int:
    """Weight-only low-bit layers compute with int8 activations per weight group (ONNX Runtime's MatMulNBits
    accuracy_level 4, what onnxruntime-genai's int4 models use on CPU); returns how many layers changed."""
    changed = 0
    for node in graph.nodes:
        if node.op == "qlinear" and node.attrs["act_quant"] == "none":
            node.attrs = {**node.attrs, "act_quant": "block_int8"}
            changed += 1
    return changed


def optimize_step(graph: Graph, quantize: Quantize | None, calibration=None, progress: bool = False) -> Graph:
    from ..passes.manager import PassContext, PassManager, resolve_pipeline

    passes = resolve_pipeline(["cse", "dce"])
    if quantize is not None:
        passes = [quantize.make_pass()] + passes
    batches = prefill_batches(calibration, graph) if calibration else None
    if quantize is not None and quantize.method == "gptq" and not batches:
        raise NnforgeError("compile_lm: GPTQ needs calibration=[token id sequences]")
    ctx = PassContext(sample_inputs=None, calibration=batches)
    return PassManager(passes, check=False, progress=(lambda p: print(f"pass {p}")) if progress else None).run(
        graph, ctx
    )


class CompiledLM:
    """A compiled decoder: generate, score (logits / perplexity), draft, save."""

    def __init__(
        self,
        graph: Graph,
        info: dict,
        backend: str,
        target: str,
        options: dict | None = None,
        tokenizer=None,
        kv: KVCompress | None = None,
        prune: PromptPrune | None = None,
    ):
        self.graph = graph  # the optimized step graph with logits for every position
        self.info = info  # spec facts the runtime needs (kv heads, head dim, eos, pad, family)
        self.backend, self.target, self.options = backend, get_target(target).name, dict(options or {})
        self.tokenizer = tokenizer
        self.kv = kv  # a KV-cache compression policy generate uses, or None
        self.prune = prune  # prefill token pruning, or None
        self.notes: list[str] = []  # e.g. the budget search's report
        self._runners: dict = {}

    # -- building -------------------------------------------------------------------------------------
    def _build(self, graph: Graph, one_token: bool = True) -> StepRunner:
        from ..backends.base import get_backend

        backend = get_backend(self.backend)
        artifact = backend.build(graph, self.target, self.options)
        decode = None
        if one_token and self.backend == "tvm" and "seq" in graph.symbols():
            # batch-1 decode steps get kernels for one row (GEMVs) and static shapes, as TVM cannot pick a
            # kernel by a symbolic row count at run time; other steps run the general build
            decode = backend.build(specialize(graph, DECODE_SHAPE), self.target, self.options)
            if self.target == "cpu":  # now, not in the first tokens (an arm or cuda library runs elsewhere)
                artifact.prepare()
                decode.prepare()
        return StepRunner(artifact, graph, decode)

    def runner(
        self, kind: str = "last", skip: Sequence[int] = (), quantize=None, mass: int | None = None
    ) -> StepRunner:
        """The step runner for generation ("last") or scoring ("all"); with ``skip`` and/or ``quantize``, a draft
        of the model: its layers ``skip`` left out, its weights quantized ("int8", "int4", a Quantize). Every
        runner reads and writes the same cache layout, so a draft can share the model's cache."""
        key = (kind, tuple(sorted(skip)), repr(quantize), mass)
        if key not in self._runners:
            graph = self.graph
            if quantize is not None:
                if graph.op_counts().get("qlinear"):
                    raise NnforgeError("runner: the model is quantized already; a draft can only skip layers")
                settings = _quantize_settings(quantize)
                graph = optimize_step(graph.copy(), settings)
                if self.backend in ("onnxrt", "ort", "onnxruntime"):
                    int8_compute(graph)
            graph = graph if kind == "all" else last_rows(graph)
            graph = skip_layers(graph, skip) if skip else graph
            graph = with_attention_mass(graph, mass) if mass is not None else graph
            self._runners[key] = self._build(graph, one_token=kind == "last")  # "all": scoring, verification
        return self._runners[key]

    def set_options(self, **options) -> None:
        """Backend options for the runners built from now on (built ones are dropped), e.g. ``spinning=False``
        when several runners take turns (speculative decoding): an idle ONNX Runtime pool must not spin."""
        self.options.update(options)
        self._runners.clear()

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        i = self.info
        cap = capacity or i["capacity"]
        cache = self.graph.meta["decoder"].get("cache", "float")
        return KVCache(i["num_layers"], batch, i["kv_heads"], cap, i["head_dim"], i.get("rope_theta"), cache)

    def decoder(self):
        """What generate steps: the plain full-capacity cache or the KV-compression policy's, behind prompt
        pruning when it is on."""
        if self.kv is None:
            inner = PlainDecoder(self.runner("last"), self.new_cache, self.info["pad_id"])
        else:
            inner = CompressedDecoder(
                self.kv, lambda window: self.runner("last", mass=window), self.new_cache, self.info["pad_id"]
            )
        if self.prune is None:
            return inner
        layers = self.info["num_layers"]
        if self.prune.layer >= layers:
            raise NnforgeError(f"PromptPrune.layer={self.prune.layer} must be below the {layers} layers")
        scout = self.runner("last", skip=range(self.prune.layer, layers), mass=self.prune.window)
        return PrunedDecoder(self.prune, inner, scout, self.new_cache)

    # -- running --------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[list[int]]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            if self.tokenizer is None:
                raise NnforgeError("generate: a text prompt needs a tokenizer (compile_lm(..., tokenizer=...))")
            texts = [prompt] if isinstance(prompt, str) else prompt
            return [self._encode_text(t, chat) for t in texts]
        return as_batch(prompt)

    def _encode_text(self, text: str, chat: bool) -> list[int]:
        tok = self.tokenizer
        hf = hasattr(tok, "apply_chat_template")  # a transformers tokenizer, else a tokenizers.Tokenizer
        if chat:
            if hf:
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            text = render_chat(self.info.get("chat_template"), text)
            return tok.encode(text, add_special_tokens=False).ids
        return list(tok(text)["input_ids"]) if hf else tok.encode(text).ids

    def generate(
        self,
        prompt,
        max_new_tokens: int = 32,
        sampling: Sampling | None = None,
        stop_tokens: Sequence[int] | None = None,
        on_token: Callable[[list[int]], None] | None = None,
        chat: bool = False,
        **sampling_kwargs,
    ) -> Text:
        """Generate from a text prompt (or a list of them; needs the tokenizer) or token ids (one sequence, a
        list of them, or a 2-D array). Sampling: ``temperature``, ``top_k``, ``top_p``, ``seed`` keywords or a
        Sampling; greedy by default. Stops at ``max_new_tokens`` or an EOS / stop token per sequence."""
        sampling = sampling or Sampling(**sampling_kwargs)
        batch = self.encode(prompt, chat)
        stops = tuple(self.info["eos_ids"]) if stop_tokens is None else tuple(stop_tokens)
        gen = generate(
            self.decoder(),
            batch,
            max_new_tokens,
            sampling,
            stops,
            on_token,
            pad_id=self.info["pad_id"],
        )
        text = None
        if self.tokenizer is not None:
            text = [self.decode(t) for t in gen.tokens]
        return Text(**vars(gen), text=text)

    def decode(self, tokens: Sequence[int]) -> str:
        kept = [t for t in tokens if t not in self.info["eos_ids"]]
        return self.tokenizer.decode(kept, skip_special_tokens=True) if hasattr(self.tokenizer, "decode") else ""

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of one sequence, from an empty cache."""
        runner, cache = self.runner("all"), self.new_cache(1)
        ids = [int(t) for t in ids]
        if len(ids) > cache.capacity:
            raise NnforgeError(f"logits: {len(ids)} tokens exceed max_length={cache.capacity}")
        out = runner.run(cache, cache.step_inputs(np.asarray([ids], np.int64)))
        return out[0]

    def perplexity(self, ids: Sequence[int]) -> float:
        """exp(mean negative log-likelihood) of each token given the ones before it. With a KV-compression
        policy the text is fed a token at a time through the policy's cache (what generation sees)."""
        if self.kv is not None:
            return self._streamed_perplexity([int(t) for t in ids])
        z = self.logits(ids)[:-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
        return float(np.exp(nll.mean()))

    def _streamed_perplexity(self, ids: list[int]) -> float:
        decoder, nll = self.decoder(), 0.0
        logits = decoder.start([ids[:1]], len(ids))
        for t in ids[1:]:
            z = logits[0].astype(np.float64)
            nll -= z[t] - z.max() - np.log(np.exp(z - z.max()).sum())
            logits = decoder.step(np.array([t]))
        return float(np.exp(nll / (len(ids) - 1)))

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, directory) -> Path:
        """A bundle: the "last" step model, its IR, the decoder facts and the tokenizer (tokenizers' JSON)."""
        from ..bundle import write_bundle

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = []
        if self.tokenizer is not None:
            tok = getattr(self.tokenizer, "backend_tokenizer", self.tokenizer)  # HF fast tokenizer -> tokenizers
            if not hasattr(tok, "to_str"):
                raise NnforgeError("save: the tokenizer cannot be saved as tokenizers' JSON")
            (d / "tokenizer.json").write_text(tok.to_str())
            files.append("tokenizer.json")
        runner = self.runner("last")
        decoder = {**self.info, "graph_meta": runner.graph.meta["decoder"]}
        if runner.decode is not None:  # the one-token build: a bundle inside, sharing this one's IR and weights
            write_bundle(runner.decode, d / DECODE_DIR, with_graph=False)
        return write_bundle(runner.artifact, d, extra={"decoder": decoder}, extra_files=files)


def compile_lm(
    model,
    max_length: int = 512,
    target: str = "cpu",
    backend: str = "onnxrt",
    quantize=None,
    calibration: Sequence[Sequence[int]] | None = None,
    tokenizer=None,
    threads: int | None = None,
    compute: str = "int8",
    kv: KVCompress | None = None,
    prune: PromptPrune | None = None,
    budget=None,
    heldout: Sequence[int] | None = None,
    prompt: Sequence[int] | None = None,
    progress: bool = False,
    kv_dtype: str = "float32",
) -> CompiledLM:
    """Compile a causal LM (Hugging Face Llama-family or GPT-2, nnforge's GPT, or a DecoderSpec) into a decoder
    step with a KV cache of ``max_length`` slots. ``quantize``: None, "int8", "int4" (weight-only, RTN; the
    LM head and embedding too) or a ``nnforge.Quantize`` (e.g. method="gptq" with ``calibration`` token
    sequences). ``compute``: "int8" (default) lets quantized layers on ONNX Runtime multiply int8 activations
    (quantized per weight group at run time, MatMulNBits accuracy_level 4), "float" dequantizes the weights.
    ``kv``: a ``nnforge.KVCompress`` policy: generation keeps its cache within the policy's budget.
    ``prune``: a ``nnforge.PromptPrune``: long prompts are pruned before the prefill.
    ``budget``: a ``nnforge.Budget`` (metric "perplexity" on ``heldout`` token ids, or "greedy" agreement after
    ``prompt``): the fastest quantization / KV-cache setting within it (see nnforge/llm/budget.py); the
    search's report is ``lm.notes``.
    ``kv_dtype``: "float32" or "int8" (TVM: keys and values stored as int8 codes with a scale per head and slot,
    a quarter of the cache's memory and of what each decode step reads from it)."""
    if budget is not None:
        from .budget import search

        if heldout is None or prompt is None:
            raise NnforgeError("compile_lm: a budget needs heldout= and prompt= token ids")
        if quantize is not None or kv is not None or kv_dtype != "float32":
            raise NnforgeError("compile_lm: give a budget or quantize/kv/kv_dtype settings, not both")
        rest = dict(max_length=max_length, target=target, backend=backend, tokenizer=tokenizer, threads=threads)
        result = search(model, budget, heldout, prompt, calibration=calibration, compute=compute, prune=prune, **rest)
        result.chosen.lm.notes = [result.report()]
        return result.chosen.lm
    _check_kv_dtype(kv_dtype, backend, kv, prune)
    if compute not in ("int8", "float"):
        raise NnforgeError(f"compile_lm: compute must be 'int8' or 'float', got {compute!r}")
    if kv is not None and not isinstance(kv, KVCompress):
        raise NnforgeError(f"compile_lm: kv must be a nnforge.KVCompress, got {kv!r}")
    if prune is not None and not isinstance(prune, PromptPrune):
        raise NnforgeError(f"compile_lm: prune must be a nnforge.PromptPrune, got {prune!r}")
    spec = read_decoder(model)
    if max_length < 2:
        raise NnforgeError(f"compile_lm: max_length must be >= 2, got {max_length}")
    if spec.positions is not None and max_length > spec.max_positions:
        raise NnforgeError(
            f"compile_lm: max_length={max_length} exceeds the model's {spec.max_positions} learned positions"
        )
    settings = _quantize_settings(quantize)
    graph = optimize_step(build_step(spec, max_length, logits="all"), settings, calibration, progress)
    if kv_dtype == "int8":
        graph = int8_cache(graph)
    onnxrt = backend in ("onnxrt", "ort", "onnxruntime")
    if settings is not None and onnxrt and compute == "int8":
        int8_compute(graph)
    options = {"threads": threads} if threads and onnxrt else {}  # TVM's pool size is TVM_NUM_THREADS
    info = {**spec_info(spec, max_length), "chat_template": getattr(tokenizer, "chat_template", None)}
    lm = CompiledLM(graph, info, backend, target, options, tokenizer, kv, prune)
    lm.runner("last")  # build now: compile errors belong to compile_lm
    return lm


def render_chat(template: str | None, text: str) -> str:
    """One user turn in the model's chat template (Jinja, rendered in a sandbox: a bundle's template is data)."""
    if not template:
        raise NnforgeError("generate: chat=True needs the model's chat template (this model has none)")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": text}], add_generation_prompt=True)


def _check_kv_dtype(kv_dtype: str, backend: str, kv, prune) -> None:
    if kv_dtype not in ("float32", "int8"):
        raise NnforgeError(f"compile_lm: kv_dtype must be 'float32' or 'int8', got {kv_dtype!r}")
    if kv_dtype == "int8" and backend != "tvm":
        raise NnforgeError(
            f"compile_lm: kv_dtype='int8' runs on backend='tvm', not {backend!r} "
            "(ONNX Runtime's GroupQueryAttention keeps a float cache)"
        )
    if kv_dtype == "int8" and (kv is not None or prune is not None):
        raise NnforgeError(
            "compile_lm: KV-cache compression and prompt pruning keep a float cache, not kv_dtype='int8'"
        )


def spec_info(spec: DecoderSpec, capacity: int) -> dict:
    return {
        "family": spec.family,
        "num_layers": spec.num_layers,
        "kv_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "capacity": capacity,
        "eos_ids": list(spec.eos_ids),
        "pad_id": spec.pad_id,
        "vocab": spec.vocab,
        "rope_theta": spec.rope_theta,
    }


def load_lm(directory, artifact, manifest: dict) -> CompiledLM:
    """A CompiledLM from a bundle read by ``nnforge.load``."""
    decoder = manifest["decoder"]
    graph = artifact.graph
    graph.meta["decoder"] = decoder.pop("graph_meta")
    tokenizer = None
    if (Path(directory) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str((Path(directory) / "tokenizer.json").read_text())
    # the bundle's graph returns the last rows' logits; the LM's own graph (scoring, drafts) returns all rows
    lm = CompiledLM(all_rows(graph), decoder, artifact.backend, artifact.target.name, tokenizer=tokenizer)
    decode = None
    if (Path(directory) / DECODE_DIR).is_dir():
        from ..bundle import read_bundle

        decode, _ = read_bundle(Path(directory) / DECODE_DIR, graph=specialize(graph, DECODE_SHAPE))
    lm._runners[("last", (), repr(None), None)] = StepRunner(artifact, graph, decode)
    return lm
