"""The nnforge command line: show, compile, run, passes, cache, and its error messages."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nnforge.cli import main
from nnforge.models import zoo


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    zm = zoo.build("cnn", "tiny")
    path = tmp_path_factory.mktemp("cli") / "cnn.onnx"
    torch.onnx.export(zm.model, zm.inputs, str(path), dynamo=True, verbose=False)
    return zm, path


def test_show_prints_the_ir(onnx_file, capsys):
    _, path = onnx_file
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graph ") and "conv2d(" in out and " : f32[" in out


def test_compile_then_run(onnx_file, tmp_path, capsys):
    zm, path = onnx_file
    assert main(["compile", str(path), "--target", "cpu", "-o", str(tmp_path / "bundle")]) == 0
    assert "bundle written" in capsys.readouterr().out
    x = tmp_path / "x.npy"
    np.save(x, zm.inputs[0].numpy())
    y = tmp_path / "y.npy"
    assert main(["run", str(tmp_path / "bundle"), "--input", str(x), "--output", str(y)]) == 0
    with torch.no_grad():
        want = zm.model(*zm.inputs).numpy()
    np.testing.assert_allclose(np.load(y), want, rtol=1e-4, atol=1e-4)


def test_run_reports_bad_inputs_clearly(onnx_file, tmp_path, capsys):
    zm, path = onnx_file
    main(["compile", str(path), "-o", str(tmp_path / "bundle")])
    capsys.readouterr()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), np.float32))
    assert main(["run", str(tmp_path / "bundle"), "--input", str(bad)]) == 2
    assert "rank 4" in capsys.readouterr().err
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["run", str(tmp_path / "bundle"), "--input", str(pickled)]) == 2
    assert "cannot read input" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nowhere")]) == 2
    assert "not an nnforge bundle" in capsys.readouterr().err


def test_passes_lists_pipelines(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "dce" in out and "pipeline O2" in out


def test_python_m_nnforge_cache_info_lists_entries_least_recently_used_first(onnx_file, tmp_path):
    """Through ``python -m nnforge`` in a fresh process, as a user runs it (the cache under its own folder)."""
    _, path = onnx_file
    env = {
        **os.environ,
        "NNFORGE_CACHE": "1",
        "NNFORGE_CACHE_DIR": str(tmp_path / "cache"),
        "NNFORGE_CACHE_MAX_BYTES": "750MB",
    }
    root = Path(__file__).resolve().parent.parent  # this checkout's nnforge

    def nnforge(*args):
        return subprocess.run(
            [sys.executable, "-m", "nnforge", *args], env=env, cwd=root, capture_output=True, text=True
        )

    for backend in ("onnxrt", "tvm"):
        done = nnforge("compile", str(path), "--backend", backend, "-o", str(tmp_path / backend))
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr  # TVM's log lines stay quiet
    info = nnforge("cache", "info")
    assert info.returncode == 0 and info.stderr == ""
    lines = info.stdout.splitlines()
    assert lines[0] == f"nnforge compile cache: {tmp_path / 'cache'}"
    assert "2 entries" in lines[1] and "of 750.0 MB" in lines[1]
    assert lines[2] == "  least recently used first:"
    assert "cpu / onnxrt" in lines[3] and "cpu / tvm" in lines[4]  # compiled in that order
