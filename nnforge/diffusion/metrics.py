"""How much a step-cache setting changes what a sampler draws: PSNR and SSIM against uncached samples from the
same noise (images in [-1, 1], data range 2), and a classifier's agreement with the requested class."""

from __future__ import annotations

import numpy as np


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(images, reference, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (inf when identical)."""
    a, b = np.clip(_np(images), -1, 1), np.clip(_np(reference), -1, 1)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(images, reference, data_range: float = 2.0) -> float:
    """Mean structural similarity (scikit-image's, 7x7 window) over the images of a [n, c, h, w] batch."""
    from skimage.metrics import structural_similarity

    a, b = np.clip(_np(images), -1, 1), np.clip(_np(reference), -1, 1)
    win = min(7, (min(a.shape[-2:]) - 1) // 2 * 2 + 1)  # odd, at most the image
    return float(
        np.mean(
            [structural_similarity(x, y, data_range=data_range, channel_axis=0, win_size=win) for x, y in zip(a, b)]
        )
    )
