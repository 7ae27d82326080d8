"""GPTQ (pure numpy): quantize a weight column by column, compensating each column's rounding error
with the calibration inputs' Hessian."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ...errors import NnforgeError
from .rtn import QWeight, from_ints, make_qweight, scale_zero, to_ints


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int,
    damp: float = 0.1,
    block: int = 128,
    act_order: bool = True,
) -> QWeight:
    """GPTQ (Frantar et al. 2022): quantize column by column, spreading each column's rounding error
    over the columns not yet quantized through the inverse Hessian H = X^T X of the calibration inputs.

    ``act_order`` visits columns by decreasing H diagonal (the inputs with most energy first); group
    scales are then fixed up front from the original weights ("static groups"), so the storage layout
    stays plain. Without it, a group takes its scale from its error-compensated columns when it starts.
    ``damp`` (fraction of the mean diagonal added to H) is high by default: few calibration tokens make
    H rank-deficient and a weak damping overfits them.
    """
    W = np.array(w, np.float64)
    n, k = W.shape
    H = np.array(hessian, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += np.eye(k) * damp * np.mean(np.diag(H))
    gs = min(group_size, k)
    static = act_order or gs == k
    scales, zeros = np.zeros((n, k // gs)), np.zeros((n, k // gs))
    if static:
        for g in range(k // gs):
            s, z = scale_zero(W[:, g * gs : (g + 1) * gs], bits)
            scales[:, g], zeros[:, g] = s, 0 if z is None else z
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // gs  # the (original) group each visited column belongs to
    Hinv = _inverse_cholesky_upper(H)
    block = block if static else max(gs, (block // gs) * gs)  # dynamic groups must not straddle blocks
    Q = np.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].copy(), Hinv[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for j in range(i2 - i1):
            col, g = i1 + j, group_of[i1 + j]
            if not static and col % gs == 0:
                s, z = scale_zero(W1[:, j : j + gs], bits)
                scales[:, g], zeros[:, g] = s, 0 if z is None else z
            scale, zero = scales[:, g], (None if bits == 8 else zeros[:, g])
            q = to_ints(W1[:, j : j + 1], scale, zero, bits)
            Q[:, col] = q[:, 0]
            err = (W1[:, j] - from_ints(q, scale, zero)[:, 0]) / Hinv1[j, j]
            W1[:, j:] -= np.outer(err, Hinv1[j, j:])
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, np.argsort(perm)]
    return make_qweight(Q, scales, None if bits == 8 else zeros, bits, gs)


def _inverse_cholesky_upper(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1; adds damping until H is numerically positive definite."""
    eye = np.eye(H.shape[0])
    extra = 0.0
    for _ in range(6):
        try:
            L = scipy.linalg.cholesky(H + extra * eye, lower=True)
            Linv = scipy.linalg.solve_triangular(L, eye, lower=True)
            return scipy.linalg.cholesky(Linv.T @ Linv, lower=False)
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(H))) or 1e-6)
    raise NnforgeError("gptq: the calibration Hessian is not positive definite even with damping")
