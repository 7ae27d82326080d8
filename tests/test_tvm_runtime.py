"""TVM bundles load and run with the TVM runtime alone (no compiler), and the CUDA bench builds here without
a GPU; the CUDA run itself needs a GPU and is skipped (with the reason) where there is none."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import nnforge
from nnforge.bench import cuda as cuda_bench
from nnforge.models import zoo


def test_cpu_bundle_runs_with_the_tvm_runtime_alone(tmp_path):
    zm = zoo.build("mlp", "tiny", batch=3)
    cm = nnforge.compile(zm.model, zm.inputs, backend="tvm", check=False, progress=False, cache=False)
    cm.save(tmp_path / "b")
    np.save(tmp_path / "x.npy", zm.inputs[0].numpy())
    with torch.no_grad():
        np.save(tmp_path / "ref.npy", zm.model(*zm.inputs).numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, nnforge, tvm
        assert tvm.base._RUNTIME_ONLY, "TVM_USE_RUNTIME_LIB=1 should load the runtime alone"
        out = nnforge.load({str(tmp_path / "b")!r}).artifact.run([np.load({str(tmp_path / "x.npy")!r})])
        np.testing.assert_allclose(out[0], np.load({str(tmp_path / "ref.npy")!r}), rtol=1e-4, atol=1e-5)
        assert "tvm.relax" not in sys.modules, "loading a bundle imported TVM's compiler"
        print("ok")
    """)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_cuda_bundle_on_a_host_without_a_driver_is_a_clear_error(tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this host has a CUDA device: the bundle loads")
    cuda_bench.build(tmp_path, families=("mlp",), size="tiny", batch=2)
    settings = json.loads((tmp_path / "mlp" / "bench.json").read_text())
    assert settings == {"family": "mlp", "size": "tiny", "batch": 2}
    io = np.load(tmp_path / "mlp" / "io.npz")
    assert set(io.files) == {"in0", "out0"} and io["out0"].shape == (2, 10)
    assert "__global__" in (tmp_path / "mlp" / "model.cu").read_text()
    with pytest.raises(nnforge.NnforgeError, match="CUDA"):
        nnforge.load(tmp_path / "mlp")


@pytest.mark.gpu
def test_cuda_bench_runs_and_matches_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    prebuilt = os.environ.get("NNFORGE_CUDA_BUNDLES")  # built elsewhere, for hosts with the TVM runtime alone
    if prebuilt:
        bundles = cuda_bench.Path(prebuilt)
    else:
        bundles = tmp_path
        cuda_bench.build(bundles, families=("mlp", "gpt"), size="tiny", batch=2)
    rows = cuda_bench.run(bundles, repeat=6)
    assert rows and not [r for r in rows if "error" in r], rows
    for r in rows:
        assert r["max_rel_error_vs_saved"] < 1e-3 and r["max_rel_error_vs_gpu_eager"] < 1e-3, r
