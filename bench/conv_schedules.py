"""Single convolution layers at real CNN shapes: eager PyTorch vs nnforge-ORT vs nnforge-TVM (batch 1, cpu).

    python bench/conv_schedules.py                          # every layer
    python bench/conv_schedules.py --only convnext whisper  # layers whose name holds one of these words
    python bench/conv_schedules.py --models                 # also small whole CNNs (MobileNet-like stacks)
    python bench/conv_schedules.py --json out/conv.json     # keep the numbers
    python bench/conv_schedules.py --one-thread             # one thread each, process CPU time per call

Layers: ConvNeXt-T's depthwise 7x7 convolutions, MobileNetV3 / EfficientNet-B0's depthwise 3x3 and 5x5
(stride 1 and 2), a grouped 3x3 (ResNeXt-like) and Whisper-tiny's encoder stem (conv1d 80->384 k3, then
384->384 k3 stride 2, on 3000 frames and on a shorter clip); with --models, a MobileNetV2-like and a
ConvNeXt-like network, Whisper's stem and Whisper-tiny's whole encoder. Each is a torch module compiled by
``nnforge.compile`` (min_block_size=1, so the whole layer runs on the backend), timed in interleaved
rounds (nnforge.bench.harness.time_interleaved, each runner's best round; with --one-thread, process CPU
time, which other processes on a shared machine disturb far less than wall time). Nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # time this checkout's nnforge, not an installed one

import nnforge
from nnforge.bench.harness import _table_text, time_interleaved
from nnforge.passes.manager import max_rel_error


@dataclass
class Layer:
    name: str
    make: object  # () -> (module, input tensor)


def depthwise(c, hw, k, stride=1):
    return lambda: (nn.Conv2d(c, c, k, stride, k // 2, groups=c), torch.randn(1, c, hw, hw))


def grouped(c, hw, k, groups, stride=1):
    return lambda: (nn.Conv2d(c, c, k, stride, k // 2, groups=groups), torch.randn(1, c, hw, hw))


def conv1d(cin, cout, frames, k=3, stride=1):
    return lambda: (nn.Conv1d(cin, cout, k, stride, k // 2), torch.randn(1, cin, frames))


LAYERS = [
    # ConvNeXt-T: a depthwise 7x7 opens every block, at 96/192/384/768 channels
    Layer("convnext dw7x7 96@56", depthwise(96, 56, 7)),
    Layer("convnext dw7x7 192@28", depthwise(192, 28, 7)),
    Layer("convnext dw7x7 384@14", depthwise(384, 14, 7)),
    Layer("convnext dw7x7 768@7", depthwise(768, 7, 7)),
    # EfficientNet-B0 / MobileNetV3: depthwise 3x3 and 5x5, stride 1 and 2
    Layer("effnet dw3x3 32@112", depthwise(32, 112, 3)),
    Layer("effnet dw3x3/2 96@112", depthwise(96, 112, 3, 2)),
    Layer("effnet dw5x5/2 144@56", depthwise(144, 56, 5, 2)),
    Layer("effnet dw3x3 240@28", depthwise(240, 28, 3)),
    Layer("effnet dw5x5 480@14", depthwise(480, 14, 5)),
    Layer("effnet dw5x5 1152@7", depthwise(1152, 7, 5)),
    Layer("mobilenet dw3x3/2 64@56", depthwise(64, 56, 3, 2)),
    # grouped (not depthwise): ResNeXt-like 32 groups
    Layer("grouped g32 3x3 128@28", grouped(128, 28, 3, 32)),
    # Whisper-tiny's encoder stem on 30 s of audio (3000 frames) and on 5 s (500)
    Layer("whisper conv1d 80->384 k3 T3000", conv1d(80, 384, 3000)),
    Layer("whisper conv1d 384->384 k3/2 T3000", conv1d(384, 384, 3000, stride=2)),
    Layer("whisper conv1d 80->384 k3 T500", conv1d(80, 384, 500)),
    Layer("whisper conv1d 384->384 k3/2 T500", conv1d(384, 384, 500, stride=2)),
]


class InvertedResidual(nn.Module):
    """MobileNetV2/EfficientNet block: 1x1 expand, depthwise kxk, 1x1 project (+ residual)."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet_like():
    """A MobileNetV2-style network at 160x160 (about 0.2 GFLOP): stem, 8 inverted residual blocks, head."""
    blocks = [(16, 24, 3, 2, 4), (24, 24, 3, 1, 4), (24, 40, 5, 2, 4), (40, 40, 5, 1, 4)]
    blocks += [(40, 80, 3, 2, 4), (80, 80, 3, 1, 4), (80, 112, 5, 1, 4), (112, 160, 5, 2, 4)]
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1),
        nn.ReLU6(),
        *[InvertedResidual(*b) for b in blocks],
        nn.Conv2d(160, 640, 1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(640, 1000),
    )
    return model, torch.randn(1, 3, 160, 160)


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7, layer norm over channels, 1x1 (as linear) expand 4x, GELU, project, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(nn.functional.gelu(self.up(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def convnext_like():
    """A small ConvNeXt (stages of 1-2 blocks at ConvNeXt-T's widths) at 128x128."""
    stem = nn.Conv2d(3, 96, 4, 4)
    stages = [ConvNeXtBlock(96), ConvNeXtBlock(96), nn.Conv2d(96, 192, 2, 2), ConvNeXtBlock(192)]
    stages += [nn.Conv2d(192, 384, 2, 2), ConvNeXtBlock(384), nn.Conv2d(384, 768, 2, 2), ConvNeXtBlock(768)]
    model = nn.Sequential(stem, *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(768, 1000))
    return model, torch.randn(1, 3, 128, 128)


class WhisperStem(nn.Module):
    """Whisper-tiny's encoder stem: conv1d 80->384 k3, GELU, conv1d 384->384 k3 stride 2, GELU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(80, 384, 3, padding=1)
        self.conv2 = nn.Conv1d(384, 384, 3, stride=2, padding=1)

    def forward(self, x):
        return nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(x))))


def whisper_tiny_encoder(frames: int):
    """Whisper-tiny's encoder (random weights, transformers' WhisperEncoder): the conv1d stem, then 4
    transformer layers of width 384 over frames / 2 positions."""
    from nnforge.models.real import ensure_torchvision

    ensure_torchvision()
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        num_mel_bins=80,
        max_source_positions=frames // 2,
    )

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = WhisperEncoder(cfg)

        def forward(self, x):
            return self.encoder(x).last_hidden_state

    return Encoder(), torch.randn(1, 80, frames)


MODELS = [
    Layer("model mobilenet-like 160px", mobilenet_like),
    Layer("model convnext-like 128px", convnext_like),
    Layer("model whisper stem T3000", lambda: (WhisperStem(), torch.randn(1, 80, 3000))),
    Layer("model whisper-tiny encoder T3000", lambda: whisper_tiny_encoder(3000)),
]


def _randomize_bn(model: nn.Module) -> None:
    """Batch-norm statistics that are not the identity, so folding them is exercised."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def cpu_interleaved(fns: dict, repeat: int, rounds: int, status, label: str) -> dict:
    """Process CPU time per call (ms) of each callable, best of ``rounds`` interleaved rounds: with one
    thread, what a call costs regardless of how long other processes on the machine hold its core."""
    best: dict = {}
    for k in range(rounds):
        status(f"{label}CPU time, round {k + 1} of {rounds}")
        for key, fn in fns.items():
            fn()
            n = max(1, repeat // rounds)
            t0 = time.process_time()
            for _ in range(n):
                fn()
            best[key] = min(best.get(key, float("inf")), (time.process_time() - t0) / n * 1e3)
    return best


def bench_one(layer: Layer, repeat: int, rounds: int, status, one_thread: bool = False) -> dict:
    torch.manual_seed(0)
    model, x = layer.make()
    model = model.eval()
    _randomize_bn(model)
    row = {"layer": layer.name}
    with torch.no_grad():
        ref = model(x).numpy()
        fns = {"eager": lambda: model(x)}
        for backend in ("onnxrt", "tvm"):
            status(f"{layer.name}: building nnforge-{backend}")
            options = {"threads": 1} if one_thread and backend == "onnxrt" else None
            cm = nnforge.compile(
                model,
                (x,),
                backend=backend,
                check=False,
                progress=False,
                cache=False,
                min_block_size=1,
                options=options,
            )
            arrays = [x.numpy()]
            row[f"{backend} err"] = max_rel_error([ref], [cm.run(arrays)[0]])
            fns[f"nnforge-{backend}"] = lambda cm=cm, arrays=arrays: cm.run(arrays)
        timer = cpu_interleaved if one_thread else time_interleaved
        best = timer(fns, repeat, rounds, status, f"{layer.name}: ")
    row.update({f"{k} ms": v for k, v in best.items()})
    return row


def render(rows: list[dict], title: str) -> str:
    cells = [
        (
            r["layer"],
            f"{r['eager ms']:.3f}",
            f"{r['nnforge-onnxrt ms']:.3f}",
            f"{r['nnforge-tvm ms']:.3f}",
            f"{r['nnforge-tvm ms'] / r['nnforge-onnxrt ms']:.2f}x",
            f"{r['tvm err']:.1e}",
        )
        for r in rows
    ]
    columns = ("layer", "eager ms", "nnforge-ORT ms", "nnforge-TVM ms", "TVM / ORT", "TVM max rel err")
    return _table_text(title, columns, ("layer",), cells, 120)


def main() -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="layers whose name contains one of these words")
    ap.add_argument("--models", action="store_true", help="also whole small CNNs built here")
    ap.add_argument("--repeat", type=int, default=30, help="calls per runner, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument(
        "--one-thread", action="store_true", help="every runner on one thread, timed in process CPU time per call"
    )
    args = ap.parse_args()
    if args.one_thread:  # before any TVM kernel runs: TVM reads it when its thread pool starts
        os.environ["TVM_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    todo = LAYERS + (MODELS if args.models else [])
    if args.only:
        todo = [la for la in todo if any(w in la.name for w in args.only)]
    rows = []
    with Console(stderr=True).status("conv bench") as status:
        for layer in todo:
            say = lambda m: status.update(f"conv bench: {m}")  # noqa: E731
            rows.append(bench_one(layer, args.repeat, args.rounds, say, args.one_thread))
    how = "one thread, CPU ms per call" if args.one_thread else "median ms"
    print(render(rows, f"convolution layers, batch 1 ({how}, best of interleaved rounds)"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
