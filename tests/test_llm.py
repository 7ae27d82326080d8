"""LLM decoding: the cached_attention op, compile_lm's decoder step against Hugging Face's own decoding,
sampling, batches, low-bit decode, self-speculative decoding with the cache, bundles and the CLI; the real
SmolLM2-135M in the last tests."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import nnforge
from nnforge.backends.base import get_backend
from nnforge.errors import NnforgeError
from nnforge.ir import Graph, interpret
from nnforge.ir.graph import TensorType
from nnforge.ir.shapes import specialize
from nnforge.llm.speculative import least_influential, speculative_generate
from nnforge.models.real import ensure_torchvision

ensure_torchvision()
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

BACKENDS = ["onnxrt", "tvm"]


# -- the op ---------------------------------------------------------------------------------------------


def _attention_graph(h=4, kv=2, d=16, cap=16, rope=True) -> Graph:
    g = Graph("cached_attention")
    ins = [
        g.add_input("q", TensorType(("B", "S", h * d))),
        g.add_input("k", TensorType(("B", "S", kv * d))),
        g.add_input("v", TensorType(("B", "S", kv * d))),
        g.add_input("past_k", TensorType(("B", kv, cap, d))),
        g.add_input("past_v", TensorType(("B", kv, cap, d))),
        g.add_input("seqlens_k", TensorType(("B",), "int32")),
        g.add_input("total_len", TensorType((), "int32")),
    ]
    if rope:
        angles = np.arange(cap)[:, None] / 10000 ** (np.arange(0, d, 2) / d)
        ins += [g.add_constant(np.cos(angles).astype(np.float32)), g.add_constant(np.sin(angles).astype(np.float32))]
    g.outputs = list(g.add_node("cached_attention", ins, {"num_heads": h, "kv_num_heads": kv}).outputs)
    return g


def _case(rng, batch, s, seqlens, total, h=4, kv=2, d=16, cap=16):
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return [
        f(batch, s, h * d),
        f(batch, s, kv * d),
        f(batch, s, kv * d),
        f(batch, kv, cap, d),
        f(batch, kv, cap, d),
    ] + [
        np.array(seqlens, np.int32),
        np.array(total, np.int32),
    ]


# (batch, new tokens, seqlens_k, total_len): a right-padded first prompt, one decode step per sequence at its
# own length, a chunk of 3 after a filled cache (speculative verification)
CASES = [(2, 5, [4, 2], 5), (2, 1, [7, 3], 8), (1, 3, [9], 10)]


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("rope", [True, False])
def test_cached_attention_matches_the_reference(backend, rope):
    g, rng = _attention_graph(rope=rope), np.random.default_rng(0)
    art = get_backend(backend).build(g, "cpu")
    for batch, s, seqlens, total in CASES:
        ins = _case(rng, batch, s, seqlens, total)
        ref, out = interpret(g, ins), art.run(ins)
        for b in range(batch):
            first = total == s
            rows = seqlens[b] + 1 if first else s  # rows past a padded prompt's end are unspecified
            filled = rows + (0 if first else seqlens[b] + 1 - s)
            np.testing.assert_allclose(out[0][b, :rows], ref[0][b, :rows], rtol=1e-4, atol=1e-5)
            for i in (1, 2):  # the cache up to the filled slots (later slots are the runtime's)
                np.testing.assert_allclose(out[i][b, :, :filled], ref[i][b, :, :filled], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [16, 8])
def test_tvm_decode_attention_kernels_match_the_reference(d):
    """A step of one token (the decode build): TVM's kernels read only each sequence's filled slots."""
    g = specialize(_attention_graph(d=d), {"S": 1})
    assert g.inputs[0].shape == ("B", 1, 4 * d)
    art, rng = get_backend("tvm").build(g, "cpu"), np.random.default_rng(1)
    for batch, seqlens, total in [(2, [7, 3], 8), (1, [0], 1), (3, [15, 0, 9], 16)]:
        ins = _case(rng, batch, 1, seqlens, total, d=d)
        ref, out = interpret(g, ins), art.run(ins)
        np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)
        for i in (1, 2):
            np.testing.assert_allclose(out[i], ref[i], rtol=1e-5, atol=1e-6)


def _int8_attention_graph(steps="S", h=4, kv=2, d=16, cap=16) -> Graph:
    from nnforge.llm.surgery import int8_cache

    g = _attention_graph(h, kv, d, cap)
    g.meta["decoder"] = {"layers": [0], "logits": "all"}
    for name in ("past_k", "past_v"):
        next(v for v in g.inputs if v.name == name).name = f"{name}_0"
    g = int8_cache(g)
    return specialize(g, {"S": steps}) if steps != "S" else g


@pytest.mark.parametrize("backend,steps", [("tvm", "S"), ("tvm", 1), ("torch", "S")])
def test_int8_cache_attention_matches_the_reference(backend, steps):
    """The int8 KV cache: new keys/values stored as int8 codes with a scale per head and slot; attention reads
    them dequantized. TVM's prompt path dequantizes the cache, its decode kernels read the codes."""
    g, rng = _int8_attention_graph(steps), np.random.default_rng(2)
    assert [n.op for n in g.nodes] == ["cached_attention_int8"] and g.inputs[3].dtype == "int8"
    art = get_backend(backend).build(g, "cpu")
    cases = CASES if steps == "S" else [c for c in CASES if c[1] == 1] + [(3, 1, [15, 0, 9], 16)]
    for batch, s, seqlens, total in cases:
        q, k, v, *_ = _case(rng, batch, s, seqlens, total)
        caches = [rng.integers(-127, 128, (batch, 2, 16, 16)).astype(np.int8) for _ in "kv"]
        scales = [rng.random((batch, 2, 16, 1), np.float32) for _ in "kv"]
        feed = dict(
            zip(
                ["q", "k", "v", "past_k_0", "past_v_0", "past_k_scale_0", "past_v_scale_0"], [q, k, v, *caches, *scales]
            )
        )
        feed.update(seqlens_k=np.array(seqlens, np.int32), total_len=np.array(total, np.int32))
        ins = [feed[v.name] for v in g.inputs]
        ref, out = interpret(g, ins), art.run(ins)
        for b in range(batch):
            first = total == s
            rows = seqlens[b] + 1 if first else s
            filled = rows + (0 if first else seqlens[b] + 1 - s)
            np.testing.assert_allclose(out[0][b, :rows], ref[0][b, :rows], rtol=1e-4, atol=1e-4)
            for i in (1, 2):  # codes: a division rounded on another machine may land one code off
                assert np.abs(out[i][b, :, :filled].astype(int) - ref[i][b, :, :filled]).max() <= 1
            for i in (3, 4):
                np.testing.assert_allclose(out[i][b, :, :filled], ref[i][b, :, :filled], rtol=1e-6)
    # the quantization itself: a row's codes span +-127 and reproduce it within half a step
    from nnforge.ops.decode import quantize_rows

    x = rng.standard_normal((5, 16)).astype(np.float32)
    codes, scale = quantize_rows(x)
    assert np.abs(codes).max(-1).tolist() == [127] * 5
    assert np.all(np.abs(codes * scale - x) <= scale / 2 + 1e-6)


def test_an_int8_kv_cache_decodes_on_tvm_close_to_float():
    model = _llama()
    float_lm = nnforge.compile_lm(model, max_length=48, backend="tvm")
    lm = nnforge.compile_lm(model, max_length=48, backend="tvm", kv_dtype="int8")
    cache = lm.new_cache(1)
    assert cache.buffers["past_k_0"].dtype == np.int8 and cache.buffers["past_k_scale_0"].shape == (1, 2, 48, 1)
    d = 16  # int8 codes plus a float32 scale per head_dim values, against float32 values
    assert cache.nbytes() / float_lm.new_cache(1).nbytes() == (d + 4) / (4 * d)
    want = float_lm.generate([PROMPT], max_new_tokens=12).tokens[0]
    got = lm.generate([PROMPT], max_new_tokens=12).tokens[0]
    assert got == want  # a random tiny model: int8 keys/values do not change its greedy choice
    ids = PROMPT + want
    assert lm.perplexity(ids) == pytest.approx(float_lm.perplexity(ids), rel=0.01)
    with pytest.raises(NnforgeError, match="kv_dtype='int8' runs on backend='tvm'"):
        nnforge.compile_lm(model, max_length=48, kv_dtype="int8")
    with pytest.raises(NnforgeError, match="keep a float cache"):
        nnforge.compile_lm(model, max_length=48, backend="tvm", kv_dtype="int8", kv=nnforge.KVCompress("h2o", 32))


def test_cached_attention_rejects_a_position_beyond_the_capacity():
    g = _attention_graph(cap=16)
    with pytest.raises(Exception, match="beyond the cache capacity 16"):
        interpret(g, _case(np.random.default_rng(0), 1, 1, [16], 17))


# -- decoders -------------------------------------------------------------------------------------------


def _llama(vocab=97, layers=3, tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _nnforge_gpt():
    from nnforge.models.zoo import GPT

    torch.manual_seed(0)
    return GPT(vocab=97, dim=64, depth=2, heads=4, max_len=128).eval()


def _hf_greedy(model, prompt, n):
    """Hugging Face's generate with its dynamic cache, EOS ignored (n tokens forced)."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id, cfg.do_sample, cfg.max_new_tokens, cfg.min_new_tokens = None, False, n, None
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=cfg)[0, len(prompt) :].tolist()


def _eager_greedy(model, prompt, n):
    """Greedy decoding with the whole sequence recomputed each step (nnforge's GPT has no cache of its own)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


PROMPT = [5, 17, 3, 88, 41, 9, 60, 2, 33]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt"])
def test_greedy_decoding_equals_the_model(family, backend):
    model = {"llama": _llama, "gpt2": _gpt2, "gpt": _nnforge_gpt}[family]()
    ref = (_eager_greedy if family == "gpt" else _hf_greedy)(model, PROMPT, 20)
    lm = nnforge.compile_lm(model, max_length=48, backend=backend)
    out = lm.generate(PROMPT, max_new_tokens=20, stop_tokens=())
    assert out.tokens[0] == ref
    assert out.steps == 19  # one prefill, then one backend call per token


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_padded_batch_decodes_each_sequence_as_alone(backend):
    model = _llama()
    lm = nnforge.compile_lm(model, max_length=48, backend=backend)
    prompts = [PROMPT, PROMPT[:4], PROMPT[2:]]
    out = lm.generate(prompts, max_new_tokens=12, stop_tokens=())
    assert out.tokens == [_hf_greedy(model, p, 12) for p in prompts]


def test_logits_and_perplexity_match_the_model():
    model = _llama()
    lm = nnforge.compile_lm(model, max_length=48)
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].double()
    np.testing.assert_allclose(lm.logits(PROMPT), ref.numpy(), rtol=1e-4, atol=1e-5)
    nll = -torch.log_softmax(ref[:-1], -1)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])]
    assert lm.perplexity(PROMPT) == pytest.approx(float(torch.exp(nll.mean())), rel=1e-5)


def test_onnxruntime_updates_the_cache_in_place():
    lm = nnforge.compile_lm(_llama(), max_length=48)
    cache = lm.new_cache(1)
    buffers = dict(cache.buffers)
    runner = lm.runner("last")
    runner.run(cache, cache.step_inputs(np.array([PROMPT])))
    assert all(cache.buffers[n] is buffers[n] for n in buffers)  # the same arrays: no copy per step
    assert np.abs(buffers["past_k_0"][0, :, : len(PROMPT)]).sum() > 0  # ... written by the model
    assert not buffers["past_k_0"][0, :, len(PROMPT) :].any()


def test_tvm_updates_the_cache_in_place_and_decodes_with_a_one_token_build(tmp_path):
    lm = nnforge.compile_lm(_llama(), max_length=48, backend="tvm")
    runner = lm.runner("last")
    assert runner.decode is not None and runner.decode.graph.inputs[0].shape == (1, 1)
    cache = lm.new_cache(1)
    buffers = {n: b.ctypes.data for n, b in cache.buffers.items()}
    runner.run(cache, cache.step_inputs(np.array([PROMPT])))
    cache.lengths += len(PROMPT)
    runner.run(cache, cache.step_inputs(np.array([[7]])))
    assert {n: b.ctypes.data for n, b in cache.buffers.items()} == buffers  # the same memory: no copy per step
    assert np.abs(cache.buffers["past_k_0"][0, :, : len(PROMPT) + 1]).sum(-1).all()  # ... written by the model
    assert not cache.buffers["past_k_0"][0, :, len(PROMPT) + 1 :].any()
    # the bundle carries the one-token build
    want = lm.generate([PROMPT], max_new_tokens=6).tokens
    lm.save(tmp_path / "lm")
    assert not list((tmp_path / "lm" / "decode").glob("weights*"))  # it shares the bundle's weights
    again = nnforge.load(tmp_path / "lm")
    assert again.runner("last").decode is not None
    assert again.generate([PROMPT], max_new_tokens=6).tokens == want == [_hf_greedy(_llama(), PROMPT, 6)]


def test_sampling_is_seeded_and_its_limits_reduce_to_greedy():
    lm = nnforge.compile_lm(_llama(), max_length=48)
    greedy = lm.generate(PROMPT, max_new_tokens=10, stop_tokens=()).tokens
    a = lm.generate(PROMPT, max_new_tokens=10, stop_tokens=(), temperature=1.5, seed=7).tokens
    assert a == lm.generate(PROMPT, max_new_tokens=10, stop_tokens=(), temperature=1.5, seed=7).tokens
    assert a != greedy  # a hot temperature on a random model leaves greedy's path
    assert lm.generate(PROMPT, max_new_tokens=10, stop_tokens=(), temperature=1.5, top_k=1, seed=1).tokens == greedy
    assert lm.generate(PROMPT, max_new_tokens=10, stop_tokens=(), temperature=1.5, top_p=1e-6, seed=1).tokens == greedy


def test_stop_tokens_end_a_sequence_and_tokens_stream():
    lm = nnforge.compile_lm(_llama(), max_length=48)
    full = lm.generate(PROMPT, max_new_tokens=12, stop_tokens=()).tokens[0]
    streamed = []
    out = lm.generate(PROMPT, max_new_tokens=12, stop_tokens=[full[4]], on_token=streamed.append)
    assert out.tokens[0] == full[: full.index(full[4]) + 1]
    assert [t[0] for t in streamed] == out.tokens[0]


def test_bad_requests_get_clear_errors():
    lm = nnforge.compile_lm(_llama(), max_length=16)
    with pytest.raises(NnforgeError, match="max_length=16"):
        lm.generate(PROMPT, max_new_tokens=10)
    with pytest.raises(NnforgeError, match="needs a tokenizer"):
        lm.generate("hello")
    with pytest.raises(NnforgeError, match="top_p"):
        lm.generate(PROMPT, top_p=0.0)
    with pytest.raises(NnforgeError, match="not a supported causal LM"):
        nnforge.compile_lm(torch.nn.Linear(3, 3))
    with pytest.raises(NnforgeError, match="quantize must be"):
        nnforge.compile_lm(_llama(), quantize="int3")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_low_bit_decode_stays_close_to_float(quantize):
    model = _llama(vocab=512, layers=2)
    text = list(np.random.default_rng(1).integers(0, 512, 40))
    float_lm = nnforge.compile_lm(model, max_length=64)
    lm = nnforge.compile_lm(model, max_length=64, quantize=quantize)
    ops = [n.op_type for n in lm.runner("last").artifact.model.graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # qkv, o, gate+up, down per layer, and the LM head
    ref, got = float_lm.perplexity(text), lm.perplexity(text)
    assert abs(got / ref - 1) < (0.02 if quantize == "int8" else 0.1)
    # the interpreter (the ops' numpy references, int8 activations per weight block included) agrees with ORT on a
    # one-row step, the decode shape; on several rows MLAS may compute in float, within the quantization error
    from nnforge.llm.compiled import prefill_batches

    for ids, tol in (([text[0]], 1e-4), ([text[1]], 1e-4), (text[:12], 3e-2)):
        ins = prefill_batches([ids], lm.graph)[0]
        np.testing.assert_allclose(lm.logits(ids), interpret(lm.graph, ins)[0][0], rtol=tol, atol=tol)


def test_gptq_int4_calibrates_on_token_sequences():
    model = _llama(vocab=512, layers=2)
    rng = np.random.default_rng(4)
    calibration = [list(rng.integers(0, 512, 24)) for _ in range(4)]
    text = list(rng.integers(0, 512, 40))
    q = nnforge.Quantize(weights="int4", method="gptq", group_size=32, embeddings=None)
    lm = nnforge.compile_lm(model, max_length=64, quantize=q, calibration=calibration)
    assert lm.graph.op_counts()["qlinear"] == 2 * 4 + 1
    ref = nnforge.compile_lm(model, max_length=64).perplexity(text)
    assert abs(lm.perplexity(text) / ref - 1) < 0.1
    with pytest.raises(NnforgeError, match="GPTQ needs calibration"):
        nnforge.compile_lm(model, max_length=64, quantize=q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_speculative_decoding_equals_greedy(backend):
    model = _llama(layers=4)
    lm = nnforge.compile_lm(model, max_length=64, backend=backend)
    greedy = lm.generate(PROMPT, max_new_tokens=24, stop_tokens=()).tokens[0]
    skip = least_influential(lm, PROMPT, 1)
    assert len(skip) == 1 and skip[0] not in (0, 3)
    spec = speculative_generate(lm, PROMPT, 24, skip, k=3)
    assert spec.tokens == greedy
    assert spec.drafted > 0 and sum(spec.history) == spec.accepted
    if backend == "onnxrt":
        lm.set_options(spinning=False)  # an ONNX Runtime session option: three sessions take turns
    quantized = speculative_generate(lm, PROMPT, 24, skip, k=3, quantize="int8")  # a draft both skipped and int8
    assert quantized.tokens == greedy


def test_a_bundle_generates_as_the_compiled_model(tmp_path):
    from nnforge.cli import main

    model = _llama(vocab=49152, layers=2)  # SmolLM2's vocabulary, so its tokenizer fits
    tokenizer = _smollm_tokenizer()
    lm = nnforge.compile_lm(model, max_length=64, tokenizer=tokenizer)
    want = lm.generate("The capital of France is", max_new_tokens=8, stop_tokens=())
    lm.save(tmp_path / "lm")
    again = nnforge.load(tmp_path / "lm")
    assert isinstance(again, nnforge.CompiledLM)
    got = again.generate("The capital of France is", max_new_tokens=8, stop_tokens=())
    assert got.tokens == want.tokens and got.text == want.text
    chat = lm.generate("Hi", max_new_tokens=4, chat=True, stop_tokens=())
    assert again.generate("Hi", max_new_tokens=4, chat=True, stop_tokens=()).tokens == chat.tokens
    (tmp_path / "lm" / "tokenizer.json").write_text("{}")
    with pytest.raises(nnforge.BundleError, match="tokenizer.json was modified"):
        nnforge.load(tmp_path / "lm")
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loaded_bundle_scores_drafts_and_saves_over_itself(backend, tmp_path):
    """A bundle keeps the generation graph (the last rows' logits); the loaded LM rebuilds the all-rows graph
    from it, so perplexity, a quantized layer-skipping draft and speculative decoding work as before saving,
    and saving over the bundle it was loaded from (whose files it maps) keeps it running."""
    from nnforge.llm.speculative import speculative_generate

    lm = nnforge.compile_lm(_llama(), max_length=48, backend=backend)
    lm.save(tmp_path / "lm")
    again = nnforge.load(tmp_path / "lm")
    text = list(np.random.default_rng(2).integers(0, 97, 30))
    assert again.perplexity(text) == pytest.approx(lm.perplexity(text), rel=1e-5)
    greedy = lm.generate(PROMPT, max_new_tokens=8, stop_tokens=()).tokens[0]
    spec = speculative_generate(again, PROMPT, 8, skip=[1], k=3, quantize="int8")
    assert spec.tokens == greedy
    again.save(tmp_path / "lm")
    assert again.generate(PROMPT, max_new_tokens=8, stop_tokens=()).tokens[0] == greedy
    assert nnforge.load(tmp_path / "lm").generate(PROMPT, max_new_tokens=8, stop_tokens=()).tokens[0] == greedy


def _smollm_tokenizer():
    from transformers import AutoTokenizer

    from nnforge.models.smollm import smollm2_folder

    return AutoTokenizer.from_pretrained(smollm2_folder())


def test_cli_generate_prints_the_bundles_text(tmp_path, capsys):
    from nnforge.cli import main

    lm = nnforge.compile_lm(_llama(vocab=49152, layers=2), max_length=64, tokenizer=_smollm_tokenizer())
    lm.save(tmp_path / "lm")
    want = lm.generate("Hello", max_new_tokens=6, chat=True).text[0]
    assert main(["generate", str(tmp_path / "lm"), "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def _cuda_exists() -> bool:
    import tvm

    return tvm.cuda(0).exist


@pytest.mark.parametrize("quantize,kv_dtype", [(None, "float32"), ("int4", "float32"), (None, "int8")])
def test_the_decoder_builds_for_cuda(quantize, kv_dtype):
    """TVM generates the decoder's CUDA kernels without a GPU; where one exists, it decodes as the CPU does."""
    model = _llama(layers=2)
    opts = dict(max_length=48, backend="tvm", quantize=quantize, kv_dtype=kv_dtype)
    lm = nnforge.compile_lm(model, target="cuda", **opts)
    assert "__global__" in lm.runner("last").artifact.cuda_source
    if _cuda_exists():
        cpu = nnforge.compile_lm(model, **opts)
        want = cpu.generate(PROMPT, max_new_tokens=12, stop_tokens=()).tokens
        assert lm.generate(PROMPT, max_new_tokens=12, stop_tokens=()).tokens == want


# -- KV-cache compression, prompt pruning --------------------------------------------------------------


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_kv_policies_keep_the_cache_within_the_budget(policy):
    model = _llama(layers=3)
    plain = nnforge.compile_lm(model, max_length=64).generate(PROMPT, max_new_tokens=30, stop_tokens=()).tokens[0]
    roomy = nnforge.compile_lm(model, max_length=64, kv=nnforge.KVCompress(policy, budget=48, sinks=2, recent=4))
    assert roomy.generate(PROMPT, max_new_tokens=30, stop_tokens=()).tokens[0] == plain  # nothing to evict
    kv = nnforge.KVCompress(policy, budget=16, sinks=2, recent=4, window=4)
    lm = nnforge.compile_lm(model, max_length=64, kv=kv)
    decoder = lm.decoder()
    out = nnforge.llm.generate.generate(decoder, [PROMPT], 30, stop_tokens=())
    assert len(out.tokens[0]) == 30  # 9 + 30 tokens through a 16-slot cache
    assert decoder.cache.capacity == 16 and decoder.state.evictions >= 2
    assert decoder.cache.lengths[0] <= 16
    tvm = nnforge.compile_lm(model, max_length=64, kv=kv, backend="tvm")
    assert tvm.generate(PROMPT, max_new_tokens=30, stop_tokens=()).tokens == out.tokens  # same policy, same tokens
    assert np.isfinite(lm.perplexity(PROMPT * 3))


def test_compaction_moves_rope_keys_to_their_new_positions():
    """Layer 0's keys depend only on their token and position: after dropping slot 0 and compacting, the cache
    must hold what a prefill of the remaining tokens writes."""
    lm = nnforge.compile_lm(_llama(), max_length=48)
    runner = lm.runner("last")
    cache, fresh = lm.new_cache(1), lm.new_cache(1)
    runner.run(cache, cache.step_inputs(np.array([PROMPT])))
    cache.lengths += len(PROMPT)
    runner.run(fresh, fresh.step_inputs(np.array([PROMPT[1:]])))
    keep = np.arange(1, len(PROMPT))[None, None, :].repeat(2, axis=1)
    cache.compact({layer: keep for layer in range(3)})
    n = len(PROMPT) - 1
    for kv in ("k", "v"):
        got, want = cache.buffers[f"past_{kv}_0"][0, :, :n], fresh.buffers[f"past_{kv}_0"][0, :, :n]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prompt_pruning_keeps_the_window_and_the_chosen_fraction():
    model = _llama(layers=3)
    prompt = list(np.random.default_rng(3).integers(0, 97, 40))
    plain = nnforge.compile_lm(model, max_length=64).generate(prompt, max_new_tokens=8, stop_tokens=()).tokens
    keep_all = nnforge.compile_lm(model, max_length=64, prune=nnforge.PromptPrune(keep=1.0, layer=1, min_tokens=4))
    assert keep_all.generate(prompt, max_new_tokens=8, stop_tokens=()).tokens == plain
    lm = nnforge.compile_lm(model, max_length=64, prune=nnforge.PromptPrune(keep=0.5, layer=1, window=4, min_tokens=4))
    decoder = lm.decoder()
    out = nnforge.llm.generate.generate(decoder, [prompt], 8, stop_tokens=())
    kept = decoder.kept[0]
    assert len(kept) == 20 and kept == sorted(kept) and kept[-4:] == [36, 37, 38, 39]
    assert len(out.tokens[0]) == 8
    with pytest.raises(NnforgeError, match="must be below"):
        nnforge.compile_lm(model, max_length=64, prune=nnforge.PromptPrune(layer=3)).decoder()


def test_float_zero_points_represent_q4_1_weights_exactly():
    from nnforge.passes.lowbit.rtn import rtn

    rng = np.random.default_rng(0)
    d, m = rng.random((8, 4, 1)) * 0.1, rng.standard_normal((8, 4, 1))  # per 32-group step and minimum
    q = rng.integers(0, 16, (8, 4, 32))
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole grid, as GGUF's Q4_1 quantizer makes it
    w = (d * q + m).reshape(8, 128).astype(np.float32)
    exact = rtn(w, 4, 32, float_zero=True).dequantize()
    np.testing.assert_allclose(exact, w, atol=1e-5)
    assert np.abs(rtn(w, 4, 32).dequantize() - w).max() > 1e-3  # integer zero points cannot


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_zero_point_int4_matches_the_reference(backend):
    from nnforge.llm.compiled import prefill_batches

    model = _llama(vocab=512, layers=2)
    q = nnforge.Quantize(weights="int4", group_size=32, embeddings="int8", zero_point="float")
    lm = nnforge.compile_lm(model, max_length=64, quantize=q, backend=backend)
    assert any(n.op == "qlinear" and n.inputs[3].dtype == "float32" for n in lm.graph.nodes)
    ids = [3, 50, 7, 400]
    ins = prefill_batches([ids], lm.graph)[0]
    np.testing.assert_allclose(lm.logits(ids), interpret(lm.graph, ins)[0][0], rtol=1e-4, atol=1e-4)


# -- the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    from nnforge.models.smollm import smollm2

    return smollm2()


def test_smollm2_greedy_equals_hugging_face_for_64_tokens(smollm):
    model, tokenizer = smollm
    lm = nnforge.compile_lm(model, max_length=256, tokenizer=tokenizer)
    answer = lm.generate("What is the capital of France?", max_new_tokens=16, chat=True)
    assert answer.text[0].strip() == "The capital of France is Paris."
    prompt = lm.encode("Tell me a story about a lighthouse keeper.", chat=True)[0]
    out = lm.generate(prompt, max_new_tokens=64, stop_tokens=())
    assert out.tokens[0] == _hf_greedy(model, prompt, 64)


def test_smollm2_int4_keeps_perplexity_within_3_percent(smollm):
    from nnforge.bench.llm import texts

    model, tokenizer = smollm
    heldout = texts(tokenizer)["heldout"][:200]
    lm = nnforge.compile_lm(model, max_length=256, tokenizer=tokenizer, quantize="int4")
    ref = nnforge.compile_lm(model, max_length=256).perplexity(heldout)
    assert lm.perplexity(heldout) / ref < 1.03  # the target: int4 within 3% of float


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("window", [0, 2])
def test_attention_mass_matches_the_reference(backend, window):
    h, kv, d, cap = 4, 2, 16, 16
    g = Graph("mass")
    ins = [
        g.add_input("q", TensorType(("B", "S", h * d))),
        g.add_input("present_k", TensorType(("B", kv, cap, d))),
        g.add_input("seqlens_k", TensorType(("B",), "int32")),
        g.add_input("total_len", TensorType((), "int32")),
    ]
    angles = np.arange(cap)[:, None] / 10000 ** (np.arange(0, d, 2) / d)
    ins += [g.add_constant(np.cos(angles).astype(np.float32)), g.add_constant(np.sin(angles).astype(np.float32))]
    attrs = {"num_heads": h, "kv_num_heads": kv, "window": window}
    g.outputs = [g.add_node("attention_mass", ins, attrs).output]
    art, rng = get_backend(backend).build(g, "cpu"), np.random.default_rng(0)
    for batch, s, seqlens, total in [(1, 5, [4], 5), (2, 1, [7, 3], 8), (1, 3, [9], 10)]:
        x = _case(rng, batch, s, seqlens, total)
        feed = [x[0], x[3], x[5], x[6]]
        ref = interpret(g, feed)[0]
        np.testing.assert_allclose(art.run(feed)[0], ref, rtol=1e-4, atol=1e-5)
        rows = min(window, s) if window else s
        np.testing.assert_allclose(ref.sum(-1), np.full((batch, kv), rows * h // kv), rtol=1e-5)  # probabilities


@pytest.mark.parametrize("metric", ["perplexity", "greedy"])
def test_the_budget_picks_the_fastest_setting_within_it(metric):
    model = _llama(vocab=512, layers=2)
    heldout = list(np.random.default_rng(2).integers(0, 512, 48))
    budget = nnforge.Budget(metric=metric, max_drop=0.5 if metric == "greedy" else 0.05, quantize=["int8", "int4"])
    lm = nnforge.compile_lm(model, max_length=160, budget=budget, heldout=heldout, prompt=PROMPT)
    report = lm.notes[0]
    assert report.count("tok/s") == 6  # float, int8, int4, each with and without an H2O cache
    chosen = next(line for line in report.splitlines() if line.startswith(" *"))
    assert "fits" in chosen
    fitting = [float(line.split()[-5]) for line in report.splitlines()[1:] if line.endswith("fits")]
    assert float(chosen.split()[-5]) == max(fitting)
    strict = nnforge.compile_lm(
        model, max_length=160, budget=nnforge.Budget(metric=metric, max_drop=0.0), heldout=heldout, prompt=PROMPT
    )
    chosen = next(line for line in strict.notes[0].splitlines() if line.startswith(" *"))
    assert float(chosen.split()[-2]) <= 0.0  # no loss at all (a quantized model may even score a hair better)
