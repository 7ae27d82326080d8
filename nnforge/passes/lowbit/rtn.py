"""Round-to-nearest quantization math (pure numpy): per-row scales and zero points, group-wise RTN,
the group size a layer gets, and static activation ranges.

A quantized [N, K] weight is a ``QWeight``: integer codes, float32 scales [N, G] and (int4) uint8
zero points [N, G]; see ops/lowbit.py for how it is stored in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ...ops.lowbit import dequantize, pack_int4


@dataclass
class QWeight:
    """A quantized [N, K] weight: integer values (unpacked), scales [N, G], zeros [N, G] or None."""

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.stored(), self.scales, self.zeros, self.bits, self.group_size)

    def stored(self) -> np.ndarray:
        """The qweight constant: int8 [N, K] or packed uint8 [N, K/2]."""
        return self.q.astype(np.int8) if self.bits == 8 else pack_int4(self.q)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.bits // 8 + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))


SHRINK = np.linspace(1.0, 0.6, 17)  # int4 range search: candidate fractions of each row's min/max


def scale_zero_float(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int4 with a float zero point per row: the 16 levels span exactly [min, max] (as GGUF's Q4_1), so a
    row need not contain 0 on its grid."""
    lo, hi = w.min(axis=1), w.max(axis=1)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32).astype(np.float64)
    return scale, (-lo / scale).astype(np.float32).astype(np.float64)


def scale_zero(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) per row of w: symmetric max-abs for 8 bits; for 4 bits asymmetric, with the
    range shrunk per row to whichever of SHRINK minimises the squared rounding error (clipping a few
    outliers buys finer steps for all the other weights)."""
    if bits == 8:
        amax = np.max(np.abs(w), axis=1)
        return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32).astype(np.float64), None  # the stored f32
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    best = (None, None, np.full(len(w), np.inf))
    for p in SHRINK:
        scale = np.where(hi > lo, (hi - lo) * p / 15.0, 1.0).astype(np.float32).astype(np.float64)
        zero = np.clip(np.round(-lo * p / scale), 0, 15)
        err = np.sum((from_ints(to_ints(w, scale, zero, bits), scale, zero) - w) ** 2, axis=1)
        better = err < best[2]
        best = (
            np.where(better, scale, best[0] if best[0] is not None else scale),
            np.where(better, zero, best[1] if best[1] is not None else zero),
            np.where(better, err, best[2]),
        )
    return best[0], best[1]


def to_ints(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """Integers for columns w [N, c] given per-row scale/zero."""
    if zero is None:
        return np.clip(np.round(w / scale[:, None]), -127, 127)
    return np.clip(np.round(w / scale[:, None] + zero[:, None]), 0, 2**bits - 1)  # zero may be a float


def from_ints(q, scale, zero):
    return (q - (0 if zero is None else zero[:, None])) * scale[:, None]


def make_qweight(q, scales, zeros, bits, gs, float_zero: bool = False) -> QWeight:
    # scales are stored as float32: recompute nothing, just cast (the dequantized values use the f32 scale)
    return QWeight(
        q.astype(np.int32),
        np.ascontiguousarray(scales, np.float32),
        None if zeros is None else np.ascontiguousarray(zeros, np.float32 if float_zero else np.uint8),
        bits,
        gs,
    )


def rtn(w: np.ndarray, bits: int, group_size: int, float_zero: bool = False) -> QWeight:
    """Round-to-nearest, group by group (int4 zero points float with ``float_zero``)."""
    w = np.asarray(w, np.float64)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size).transpose(1, 0, 2)  # [G, N, gs]
    qs, ss, zs = [], [], []
    for grp in groups:
        s, z = scale_zero_float(grp) if float_zero and bits == 4 else scale_zero(grp, bits)
        qs.append(to_ints(grp, s, z, bits))
        ss.append(s)
        zs.append(z)
    q = np.concatenate(qs, axis=1)
    return make_qweight(q, np.stack(ss, 1), None if bits == 8 else np.stack(zs, 1), bits, group_size, float_zero)


def group_size_for(k: int, bits: int, wanted: int) -> int | None:
    """The group size a layer of K inputs gets: per channel for int8; for int4 the largest power of two
    <= ``wanted`` (and >= 16) dividing K, else the whole row when K is even; None when K cannot be packed."""
    if bits == 8:
        return k
    g = wanted
    while g >= 16:
        if k % g == 0:
            return g
        g //= 2
    return k if k % 2 == 0 else None


# ---------------------------------------------------------------------------------------
# static activation ranges (``cfg``: the Quantize settings' observer and percentile)
# ---------------------------------------------------------------------------------------


def _range_minmax(x: np.ndarray, cfg):
    return float(x.min()), float(x.max())


def _range_percentile(x: np.ndarray, cfg):
    return float(np.percentile(x, 100 - cfg.percentile)), float(np.percentile(x, cfg.percentile))


OBSERVERS = {"minmax": _range_minmax, "percentile": _range_percentile}


def static_params(arrays: Sequence[np.ndarray], cfg) -> tuple[float, int]:
    """uint8 scale and zero point covering the observed range (which always includes 0)."""
    x = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays])
    lo, hi = OBSERVERS[cfg.observer](x, cfg)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / 255.0)) if hi > lo else 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))
