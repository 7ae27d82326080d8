"""The five model families nnforge is tested and benchmarked on, built in code with random weights.

``build(family, size)`` returns a ``ZooModel``: the eval-mode module, example inputs and the
``dynamic_shapes`` spec for torch.export. "tiny" sizes keep the test suite fast; "bench" sizes are
the shapes the issues measure (ViT-S/16 224, MiniLM-L6-shaped encoder at seq 128, a 4-layer
d=256 GPT at seq 128, ResNet-18 at 224).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("mlp", "cnn", "vit", "bert", "gpt")


@dataclass
class ZooModel:
    family: str
    model: nn.Module
    inputs: tuple
    dynamic_shapes: Any  # for torch.export, or None
    input_names: tuple[str, ...]


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=256, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + idt)


class ResNet(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000, in_ch=3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class ViTAttention(nn.Module):
    """Multi-head attention written out by hand, as in timm's ViT."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def drop_path(x, p: float, training: bool):
    """Stochastic depth (as in timm): in training, zero a residual branch for a random fraction ``p`` of the
    samples and scale the rest by 1 / (1 - p); the identity in eval mode, so exported graphs do not see it."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), self.drop_path, self.training)


class ViT(nn.Module):
    """``drop_path``: stochastic depth rate of the last block, rising linearly from 0 at the first (training only)."""

    def __init__(self, img=224, patch=16, dim=384, depth=12, heads=6, classes=1000, in_ch=3, drop_path=0.0):
        super().__init__()
        self.patch = nn.Conv2d(in_ch, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, drop_path=p) for p in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class BertEncoder(nn.Module):
    """BERT-style encoder from nn.TransformerEncoderLayer with a padding mask and mean pooling."""

    def __init__(self, vocab=1000, dim=384, depth=6, heads=12, ffn=1536, max_len=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tok(input_ids) + self.pos(pos))
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)


class GPTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab=1000, dim=256, depth=4, heads=4, max_len=512):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[:, : idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def _randomize_bn(model: nn.Module, gen: torch.Generator):
    """Give BatchNorm layers non-trivial running statistics so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def build(family: str, size: str = "tiny", batch: int = 2, seed: int = 0) -> ZooModel:
    """Build one family at "tiny" (tests) or "bench" (the issues' measured shapes) size."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if size not in ("tiny", "bench"):
        raise ValueError(f"unknown size {size!r}; choose 'tiny' or 'bench'")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tiny = size == "tiny"
    B = torch.export.Dim("batch", min=1, max=1024)
    S = torch.export.Dim("seq", min=2, max=64 if tiny else 512)  # bounded by the position table
    if family == "mlp":
        model = MLP(32, 64, 10) if tiny else MLP(512, 2048, 1000)
        x = torch.randn(batch, 32 if tiny else 512, generator=gen)
        zm = ZooModel(family, model, (x,), ({0: B},), ("x",))
    elif family == "cnn":
        model = ResNet((8, 16), (1, 1), classes=10) if tiny else ResNet()
        x = torch.randn(batch, 3, 32 if tiny else 224, 32 if tiny else 224, generator=gen)
        zm = ZooModel(family, model, (x,), ({0: B},), ("x",))
    elif family == "vit":
        model = ViT(img=32, patch=8, dim=32, depth=2, heads=4, classes=10) if tiny else ViT()
        x = torch.randn(batch, 3, 32 if tiny else 224, 32 if tiny else 224, generator=gen)
        zm = ZooModel(family, model, (x,), ({0: B},), ("x",))
    elif family == "bert":
        model = BertEncoder(vocab=100, dim=32, depth=2, heads=4, ffn=64, max_len=64) if tiny else BertEncoder()
        seq = 16 if tiny else 128
        ids = torch.randint(0, 100 if tiny else 1000, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq * 3 // 4 :] = 0  # the last sequence is padded
        zm = ZooModel(family, model, (ids, mask), ({0: B, 1: S}, {0: B, 1: S}), ("input_ids", "attention_mask"))
    else:
        model = GPT(vocab=100, dim=32, depth=2, heads=4, max_len=64) if tiny else GPT()
        seq = 16 if tiny else 128
        ids = torch.randint(0, 100 if tiny else 1000, (batch, seq), generator=gen)
        zm = ZooModel(family, model, (ids,), ({0: B, 1: S},), ("input_ids",))
    _randomize_bn(zm.model, gen)
    zm.model.eval()
    return zm
