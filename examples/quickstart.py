"""Quickstart: compile a model, call it, save the bundle, load it back."""

import tempfile

import torch

import nnforge

model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).eval()
x = torch.randn(8, 16)

fast = nnforge.compile(model, (x,), target="cpu")  # backend "onnxrt" by default on cpu
print(fast.report())
print("max error vs eager:", (fast(x) - model(x)).abs().max().item())

out = tempfile.mkdtemp()
fast.save(out)
again = nnforge.load(out)
print("reloaded bundle agrees:", torch.equal(again(x), fast(x)))
