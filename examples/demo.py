"""The demo `make demo` runs: compile a small ViT for the CPU and show what nnforge did.

Prints the IR summary, the pass table, latency against eager PyTorch and how closely the
compiled model's outputs agree with eager.
"""

import time

import torch

import nnforge
from nnforge.bench.harness import time_call
from nnforge.ir.printer import summary
from nnforge.models import zoo


def main():
    torch.manual_seed(0)
    # a small ViT: 64x64 images, 8x8 patches, 4 blocks of width 128
    model = zoo.ViT(img=64, patch=8, dim=128, depth=4, heads=4, classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=256)

    with torch.no_grad():  # timed before any ONNX Runtime session exists: its spinning threads would skew eager
        eager_ms = time_call(lambda: model(x), repeat=30)

    t0 = time.perf_counter()
    fast = nnforge.compile(model, (x,), target="cpu", dynamic_shapes=({0: batch},))
    print(f"compiled in {time.perf_counter() - t0:.1f} s\n")
    print("IR before passes:", summary(fast.source_graph))
    print("IR after passes: ", summary(fast.graph), "\n")
    print(fast.report())

    fast_ms = time_call(lambda: fast(x), repeat=30)
    print(
        f"latency, batch 4: eager {eager_ms:.2f} ms, nnforge ({fast.backend}) {fast_ms:.2f} ms "
        f"-> {eager_ms / fast_ms:.2f}x"
    )

    for n in (1, 7):  # the batch axis was exported as dynamic
        xn = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            err = (fast(xn) - model(xn)).abs().max().item()
        print(f"batch {n}: max |nnforge - eager| = {err:.2e}")


if __name__ == "__main__":
    main()
