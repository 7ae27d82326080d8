"""The bench harness behind ``nnforge bench`` (and bench/run.py): nnforge against eager PyTorch, torch.compile,
ONNX Runtime and TVM used directly, as ratios in one run."""
