"""``nnforge.Quantize``: what the low-bit passes quantize and how (validated when made)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import NnforgeError
from ..manager import PassOptions

WEIGHT_BITS = {"int8": 8, "int4": 4}


@dataclass
class Quantize(PassOptions):
    """What to quantize and how. ``nnforge.compile(..., quantize=Quantize(...), calibration=batches)``.

    weights      "int8" (per output channel, symmetric) | "int4" (group-wise, with zero points)
    method       "rtn" (round to nearest) | "gptq" (needs calibration)
    group_size   int4 group along the input features: 32 | 64 | 128 (smaller where a layer is narrower)
    activations  None (weight-only) | "dynamic" (int8 per token at run time) | "dynamic_tensor" (uint8, one
                 range per tensor at run time: ONNX Runtime's fused DynamicQuantizeMatMul) | "static" (calibrated,
                 per tensor)
    smooth       SmoothQuant strength alpha in [0, 1]; 0 = off (only used with activations)
    observer     static activation range: "minmax" | "percentile" (``percentile`` of the values)
    embeddings   embedding tables: "int8" | "int4" | None (keep float)
    mixed        None, {"size": 0.3} (constant bytes <= 0.3x float) or {"max_error": 0.02}
                 (relative output error on calibration data): per layer 8 / 4 bits / float
    exclude      layer names (weight names) containing any of these stay float
    zero_point   int4 RTN linear layers: "int" (a 4-bit code, the grid holds 0) | "float" (the group's exact
                 min: finer steps, and GGUF Q4_1 weights are represented exactly)
    """

    weights: str = "int8"
    method: str = "rtn"
    group_size: int = 128
    activations: str | None = None
    smooth: float = 0.0
    observer: str = "minmax"
    percentile: float = 99.99
    embeddings: str | None = "int8"
    mixed: dict | None = None
    exclude: tuple = ()
    zero_point: str = "int"

    def __post_init__(self):
        _choice("weights", self.weights, WEIGHT_BITS)
        _choice("method", self.method, ("rtn", "gptq"))
        _choice("activations", self.activations, (None, "dynamic", "dynamic_tensor", "static"))
        _choice("observer", self.observer, ("minmax", "percentile"))
        _choice("embeddings", self.embeddings, (None, "int8", "int4"))
        _choice("zero_point", self.zero_point, ("int", "float"))
        if self.group_size not in (16, 32, 64, 128, 256):
            raise NnforgeError(f"Quantize.group_size must be a power of two in 16..256, got {self.group_size}")
        if not 0.0 <= self.smooth <= 1.0:
            raise NnforgeError(f"Quantize.smooth must lie in [0, 1], got {self.smooth}")
        if self.activations and self.weights != "int8":
            raise NnforgeError("Quantize: quantized activations need weights='int8'")
        if self.mixed is not None and (
            not isinstance(self.mixed, dict) or len(self.mixed) != 1 or not set(self.mixed) <= {"size", "max_error"}
        ):
            raise NnforgeError(f"Quantize.mixed must be {{'size': ratio}} or {{'max_error': x}}, got {self.mixed!r}")
        self.exclude = tuple(self.exclude)

    pass_name = "quantize"  # the pass that carries out all of these settings

    def passes(self) -> list[str]:
        """The single-purpose pass names that carry out these settings, in order (the "quantize" pass
        alone does the same)."""
        if self.mixed:
            main = "quantize_mixed"
        elif self.activations:
            main = "quantize_w8a8_static" if self.activations == "static" else "quantize_w8a8"
        else:
            main = "quantize_int8" if self.weights == "int8" else f"quantize_int4_{self.method}"
        return (["smoothquant"] if self.smooth and self.activations else []) + [main]


def _choice(what, value, allowed):
    if value not in allowed:
        raise NnforgeError(f"Quantize.{what} must be one of {list(allowed)}, got {value!r}")
