"""Low-bit passes: weight quantization (int8, int4 RTN/GPTQ), W8A8, SmoothQuant, mixed precision.

Each pass takes its settings as an ``nnforge.Quantize`` (settings.py): ``QuantizeW8A8(Quantize(
activations="dynamic_tensor"))``; by name in a pipeline it runs with the defaults. Each pass name
fixes what it is about and takes the rest from the settings:

    quantize             everything from the settings
    quantize_int8        int8 weights, per output channel, symmetric, round-to-nearest (or GPTQ)
    quantize_int4_rtn    int4 weights, group-wise with zero points, round-to-nearest
    quantize_int4_gptq   int4 weights, GPTQ (Hessian from calibration activations, error compensation)
    quantize_w8a8        int8 weights + int8 activations (dynamic per token unless activations says
                         "dynamic_tensor" or "static")
    quantize_w8a8_static int8 weights + calibrated per-tensor uint8 activations (min/max or percentile)
    quantize_mixed       per-layer 8 / 4 bits / float from measured sensitivity, for a size or error target
    smoothquant          migrate activation outliers into the weights (lossless refactoring; run before W8A8)

Layers: linear/linear_act/matmul-by-constant -> ``qlinear``; conv2d -> ``qconv2d`` (weight-only,
round-to-nearest); embedding gathers -> ``qgather`` (``embeddings`` setting). See ops/lowbit.py
for the storage layout. Every pass reports per layer the relative output error it caused on the
calibration data in ``PassResult.stats["layers"]`` and the constant bytes before/after.

Modules: settings (Quantize), rtn and gptq (the numpy math), layers (plans and rewrites), passes,
mixed (mixed precision), smoothquant.
"""

from . import mixed, passes, smoothquant  # noqa: F401  (they register their passes)
from .settings import Quantize

__all__ = ["Quantize"]
