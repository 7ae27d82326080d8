"""Real architectures (nnforge.models.real: timm, transformers, diffusers with random weights, tiny configs)
compile on ONNX Runtime and TVM with no torch fallback at all, and match eager PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

import nnforge
from nnforge.models import real


@pytest.fixture(scope="module")
def built():
    """Each model built once for both backends: (model, inputs, eager outputs)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = real.build(name)
            with torch.no_grad():
                ref = [t.numpy() for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
            cache[name] = model, inputs, ref
        return cache[name]

    return get


@pytest.mark.parametrize("backend", ["onnxrt", "tvm"])
@pytest.mark.parametrize("name", list(real.ZOO))
def test_real_model_compiles_without_fallback_and_matches_eager(built, name, backend):
    model, inputs, ref = built(name)
    # fallback=False: a node the backend cannot take refuses the model instead of running on torch
    cm = nnforge.compile(model, inputs, backend=backend, fallback=False, check=False, cache=False, progress=False)
    assert cm.backend == backend  # a partitioned build would say "<backend>+torch"
    assert [n.op for n in cm.graph.nodes if n.op == "torch_op"] == []
    got = cm.run([x.numpy() for x in inputs])
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


def test_unknown_model_and_size_are_named():
    with pytest.raises(nnforge.NnforgeError, match="unknown real model 'resnet1000'.*resnet50"):
        real.build("resnet1000")
    with pytest.raises(nnforge.NnforgeError, match="unknown size 'huge'"):
        real.build("bert", "huge")


def test_bench_zoo_cli_times_the_chosen_models_and_runners(tmp_path, capsys):
    """``nnforge bench --zoo``: one row per model and runner, each measured and matching eager (no time asserted)."""
    from nnforge import cli

    out = tmp_path / "zoo.json"
    argv = ["bench", "--zoo", "--size", "tiny", "--model", "bert", "--model", "swin_t", "--repeat", "2"]
    argv += ["--runner", "nnforge-onnxrt", "--runner", "nnforge-tvm", "--json", str(out)]
    assert cli.main(argv) == 0
    assert "swin_t" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert {(r["family"], r["runner"]) for r in rows} == {
        (m, r) for m in ("bert", "swin_t") for r in ("eager", "nnforge-onnxrt", "nnforge-tvm")
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["max_rel_error"] < 1e-4, r
