"""What a decoder is, read from the model: ``DecoderSpec`` holds a causal LM's hyper-parameters and weights.

Why read modules instead of tracing the forward: a decoder's cache is state that Hugging Face threads
through Python objects (``DynamicCache``) and its masks are built by Python per call; what a
compiler needs is the math of one step, which is fixed by the architecture. So, like
onnxruntime-genai's model builder and MLC-LLM, nnforge recognises the family from the module tree
and reads its weights; ``build.py`` then writes the step as IR with the cache as explicit inputs and
outputs. Families:

    llama   Hugging Face LlamaForCausalLM and the models that share its module names
            (Mistral, Qwen2 (q/k/v biases), SmolLM): RMSNorm, RoPE, GQA, SiLU-gated MLP
    gpt2    Hugging Face GPT2LMHeadModel: LayerNorm, learned positions, MHA, GELU(tanh) MLP
    gpt     nnforge's own GPT (nnforge.models.zoo.GPT)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import NnforgeError


def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy().copy()


@dataclass
class Layer:
    attn_norm: np.ndarray
    qkv: np.ndarray  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k, v rows stacked
    o: np.ndarray  # [hidden, heads * head_dim]
    mlp_norm: np.ndarray
    up: np.ndarray  # gated: [2 * ffn, hidden] (gate rows, then up rows); plain: [ffn, hidden]
    down: np.ndarray  # [hidden, ffn]
    attn_norm_bias: np.ndarray | None = None
    qkv_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    mlp_norm_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None


@dataclass
class DecoderSpec:
    family: str
    vocab: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    norm: str  # "rms" | "layer"
    eps: float
    mlp: str  # "silu_gated" | "gelu_tanh"
    embed: np.ndarray  # [vocab, hidden]
    final_norm: np.ndarray
    lm_head: np.ndarray  # [vocab, hidden] (a copy of embed when tied)
    layers: list[Layer] = field(default_factory=list)
    final_norm_bias: np.ndarray | None = None
    positions: np.ndarray | None = None  # learned position table [max_positions, hidden]
    rope_theta: float | None = None
    max_positions: int = 2048
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def weight_bytes(self) -> int:
        arrays = [self.embed, self.lm_head] + [a for layer in self.layers for a in vars(layer).values()]
        return sum(a.nbytes for a in arrays if a is not None)


def _eos(config, generation_config) -> tuple[int, ...]:
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise NnforgeError(f"compile_lm: RoPE scaling {kind!r} is not supported yet (only the default RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise NnforgeError("compile_lm: the config has no rope_theta")
    return float(theta)


def from_hf_llama(model) -> DecoderSpec:
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NnforgeError(f"compile_lm: Llama-family MLP activation {cfg.hidden_act!r} is not supported (silu only)")
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for blk in model.model.layers:
        a, m = blk.self_attn, blk.mlp
        biases = [_np(p.bias) for p in (a.q_proj, a.k_proj, a.v_proj)]
        layers.append(
            Layer(
                attn_norm=_np(blk.input_layernorm.weight),
                qkv=np.concatenate([_np(a.q_proj.weight), _np(a.k_proj.weight), _np(a.v_proj.weight)]),
                qkv_bias=np.concatenate(biases) if biases[0] is not None else None,
                o=_np(a.o_proj.weight),
                o_bias=_np(a.o_proj.bias),
                mlp_norm=_np(blk.post_attention_layernorm.weight),
                up=np.concatenate([_np(m.gate_proj.weight), _np(m.up_proj.weight)]),
                down=_np(m.down_proj.weight),
                up_bias=None
                if m.gate_proj.bias is None
                else np.concatenate([_np(m.gate_proj.bias), _np(m.up_proj.bias)]),
                down_bias=_np(m.down_proj.bias),
            )
        )
    return DecoderSpec(
        family="llama",
        vocab=cfg.vocab_size,
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        norm="rms",
        eps=float(cfg.rms_norm_eps),
        mlp="silu_gated",
        embed=_np(model.model.embed_tokens.weight),
        final_norm=_np(model.model.norm.weight),
        lm_head=_np(model.lm_head.weight),
        layers=layers,
        rope_theta=_rope_theta(cfg),
        max_positions=int(cfg.max_position_embeddings),
        eos_ids=_eos(cfg, getattr(model, "generation_config", None)),
        pad_id=int(cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0),
    )


def from_hf_gpt2(model) -> DecoderSpec:
    cfg = model.config
    t, heads = model.transformer, cfg.n_head
    layers = []
    for blk in t.h:  # GPT-2's Conv1D stores weights [in, out]
        layers.append(
            Layer(
                attn_norm=_np(blk.ln_1.weight),
                attn_norm_bias=_np(blk.ln_1.bias),
                qkv=_np(blk.attn.c_attn.weight).T.copy(),
                qkv_bias=_np(blk.attn.c_attn.bias),
                o=_np(blk.attn.c_proj.weight).T.copy(),
                o_bias=_np(blk.attn.c_proj.bias),
                mlp_norm=_np(blk.ln_2.weight),
                mlp_norm_bias=_np(blk.ln_2.bias),
                up=_np(blk.mlp.c_fc.weight).T.copy(),
                up_bias=_np(blk.mlp.c_fc.bias),
                down=_np(blk.mlp.c_proj.weight).T.copy(),
                down_bias=_np(blk.mlp.c_proj.bias),
            )
        )
    if getattr(cfg, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise NnforgeError(f"compile_lm: GPT-2 activation {cfg.activation_function!r} is not supported")
    return DecoderSpec(
        family="gpt2",
        vocab=cfg.vocab_size,
        hidden=cfg.n_embd,
        heads=heads,
        kv_heads=heads,
        head_dim=cfg.n_embd // heads,
        norm="layer",
        eps=float(cfg.layer_norm_epsilon),
        mlp="gelu_tanh",
        embed=_np(t.wte.weight),
        positions=_np(t.wpe.weight),
        final_norm=_np(t.ln_f.weight),
        final_norm_bias=_np(t.ln_f.bias),
        lm_head=_np(model.lm_head.weight),
        layers=layers,
        max_positions=int(cfg.n_positions),
        eos_ids=_eos(cfg, getattr(model, "generation_config", None)),
    )


def from_nnforge_gpt(model) -> DecoderSpec:
    heads, c = model.blocks[0].heads, model.tok.weight.shape[1]
    layers = [
        Layer(
            attn_norm=_np(b.ln1.weight),
            attn_norm_bias=_np(b.ln1.bias),
            qkv=_np(b.qkv.weight),
            qkv_bias=_np(b.qkv.bias),
            o=_np(b.proj.weight),
            o_bias=_np(b.proj.bias),
            mlp_norm=_np(b.ln2.weight),
            mlp_norm_bias=_np(b.ln2.bias),
            up=_np(b.fc.weight),
            up_bias=_np(b.fc.bias),
            down=_np(b.out.weight),
            down_bias=_np(b.out.bias),
        )
        for b in model.blocks
    ]
    return DecoderSpec(
        family="gpt",
        vocab=model.tok.weight.shape[0],
        hidden=c,
        heads=heads,
        kv_heads=heads,
        head_dim=c // heads,
        norm="layer",
        eps=float(model.ln.eps),
        mlp="gelu_tanh",
        embed=_np(model.tok.weight),
        positions=_np(model.pos)[0],
        final_norm=_np(model.ln.weight),
        final_norm_bias=_np(model.ln.bias),
        lm_head=_np(model.head.weight),
        layers=layers,
        max_positions=int(model.pos.shape[1]),
    )


def read_decoder(model) -> DecoderSpec:
    """The DecoderSpec of a supported causal LM (a DecoderSpec passes through)."""
    if isinstance(model, DecoderSpec):
        return model
    from ..models.zoo import GPT

    if isinstance(model, GPT):
        return from_nnforge_gpt(model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(model, "lm_head"):
        first = inner.layers[0] if len(inner.layers) else None
        if first is not None and hasattr(first, "self_attn") and hasattr(first.mlp, "gate_proj"):
            return from_hf_llama(model)
    if hasattr(model, "transformer") and hasattr(model.transformer, "wpe") and hasattr(model, "lm_head"):
        return from_hf_gpt2(model)
    raise NnforgeError(
        f"compile_lm: {type(model).__name__} is not a supported causal LM (Hugging Face Llama-family or GPT-2, "
        "or nnforge.models.zoo.GPT)"
    )
