"""Reliability: the compile cache, the coverage dry run (explain), concurrency, NaN/Inf, bad calls."""

from __future__ import annotations

import importlib.util
import io
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import nnforge
from nnforge import cache
from nnforge.cli import main as cli
from nnforge.models import zoo
from nnforge.partition import BuildSettings
from nnforge.passes.lowbit import Quantize
from nnforge.passes.lowbit.passes import QuantizeInt8
from nnforge.passes.manager import PASSES, resolve_pipeline


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NNFORGE_CACHE_DIR", str(d))
    return d


def _mlp():
    zm = zoo.build("mlp", "tiny")
    return zm.model, zm.inputs


# ---------------------------------------------------------------------------------------
# compile cache
# ---------------------------------------------------------------------------------------


def test_second_compile_comes_from_the_cache(cache_dir):
    model, xs = _mlp()
    first = nnforge.compile(model, xs, cache=True, progress=False)
    assert not first.from_cache and first.cache_key and (cache_dir / first.cache_key / "manifest.json").is_file()
    second = nnforge.compile(model, xs, cache=True, progress=False)
    assert second.from_cache and second.cache_key == first.cache_key
    assert "compile cache" in second.report() and second.records  # the pass table comes back too
    assert torch.equal(second(*xs), first(*xs))
    assert cache.info().entries == 1


def test_the_key_covers_weights_target_backend_pipeline_and_options(cache_dir):
    model, xs = _mlp()
    g = nnforge.import_model(model, xs)
    passes = resolve_pipeline("O2")

    def build(backend="onnxrt", target="cpu", options=None, fallback=True, min_block_size=3):
        return BuildSettings.resolve(target, backend, options, fallback=fallback, min_block_size=min_block_size)

    base = cache.compile_key(g, passes, build())
    assert base == cache.compile_key(g.copy(), resolve_pipeline("O2"), build())
    other = g.copy()
    name = next(iter(other.constants))
    other.constants[name] = other.constants[name] + 1  # one changed weight
    assert cache.compile_key(other, passes, build()) != base
    assert cache.compile_key(g, passes, build("tvm")) != base
    assert cache.compile_key(g, passes, build("onnxrt", "cuda")) != base
    assert cache.compile_key(g, resolve_pipeline("O1"), build()) != base
    assert cache.compile_key(g, passes, build(options={"opt_level": "basic"})) != base
    assert cache.compile_key(g, passes, build(min_block_size=5)) != base
    # a pass's typed options are part of its fingerprint
    int8 = cache.compile_key(g, passes + [QuantizeInt8(Quantize(group_size=128))], build())
    assert int8 == cache.compile_key(g, passes + [QuantizeInt8(Quantize())], build())
    assert int8 != cache.compile_key(g, passes + [QuantizeInt8(Quantize(exclude=("fc",)))], build())


def test_changing_a_pass_invalidates(cache_dir, monkeypatch):
    model, xs = _mlp()
    first = nnforge.compile(model, xs, cache=True, progress=False)
    monkeypatch.setattr(PASSES["cse"], "version", "changed")  # a pass says its behaviour changed
    second = nnforge.compile(model, xs, cache=True, progress=False)
    assert not second.from_cache and second.cache_key != first.cache_key


def test_editing_a_pass_source_changes_its_fingerprint(tmp_path):
    src = tmp_path / "my_pass.py"
    body = (
        "from nnforge import Pass, PassResult\n"
        "class Mine(Pass):\n    name = 'mine_fp'\n    def run(self, g, ctx):\n        return PassResult(False)\n"
    )
    src.write_text(body)

    def fingerprint():
        spec = importlib.util.spec_from_file_location("my_pass_fp", src)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["my_pass_fp"] = mod
        spec.loader.exec_module(mod)
        return cache.pass_fingerprint(mod.Mine())

    before = fingerprint()
    src.write_text(body + "# a comment is enough: the source changed\n")
    after = fingerprint()
    sys.modules.pop("my_pass_fp", None)
    assert before["name"] == after["name"] and before["source"] != after["source"]


def test_a_damaged_entry_is_rebuilt(cache_dir):
    model, xs = _mlp()
    first = nnforge.compile(model, xs, cache=True, progress=False)
    (cache_dir / first.cache_key / "model.onnx").write_bytes(b"garbage")
    again = nnforge.compile(model, xs, cache=True, progress=False)
    assert not again.from_cache
    assert nnforge.compile(model, xs, cache=True, progress=False).from_cache


def test_cache_is_off_with_nnforge_cache_0_and_for_lossy_compiles(cache_dir, monkeypatch):
    model, xs = _mlp()
    monkeypatch.setenv("NNFORGE_CACHE", "0")
    assert nnforge.compile(model, xs, progress=False).cache_key is None
    monkeypatch.setenv("NNFORGE_CACHE", "1")
    assert nnforge.compile(model, xs, progress=False).cache_key is not None  # on by default
    zm = zoo.build("vit", "tiny")
    cal = [(torch.randn(2, 3, 32, 32),) for _ in range(2)]
    lossy = nnforge.compile(zm.model, zm.inputs, tokens=nnforge.TokenMerge(r=2), calibration=cal, progress=False)
    assert lossy.cache_key is None


def test_cache_cli_info_and_clear(cache_dir, capsys):
    model, xs = _mlp()
    nnforge.compile(model, xs, cache=True, progress=False)
    assert cli(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "1 entry" in out
    assert cli(["cache", "clear"]) == 0
    assert cache.info().entries == 0


# ---------------------------------------------------------------------------------------
# explain: the coverage dry run
# ---------------------------------------------------------------------------------------


class Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)) * 2.0 + 1.0
        h = torch.logcumsumexp(h, dim=1)  # no IR op: falls back to torch
        return torch.sigmoid(torch.relu(self.b(h)) - 0.5)


def test_explain_lists_every_op_backend_partition_and_source_line():
    buf = io.StringIO()
    exp = nnforge.explain(Custom(), (torch.randn(2, 6),), target="cpu", file=buf)
    text = buf.getvalue()
    assert text.strip() == str(exp).strip()
    assert {"onnxrt", "tvm", "torch"} <= set(exp.backends)
    rare = next(r for r in exp.rows if r.op == "aten.logcumsumexp.default")
    assert rare.verdicts["onnxrt"] and not rare.verdicts["torch"]
    assert rare.partition.endswith("torch") and "torch.logcumsumexp(h, dim=1)" in rare.code
    assert "test_reliability.py" in rare.source
    assert [r.partition for r in exp.rows if r.op != "aten.logcumsumexp.default"][0].endswith("onnxrt")
    for needle in (
        "partition plan",
        f"falls back: 1 of {len(exp.rows)} node(s) (torch 1)",
        "op coverage",
        "aten.logcumsumexp.default",
        "no ONNX equivalent",
    ):
        assert needle in text, needle


def test_explain_a_fully_supported_model_and_from_the_cli(tmp_path, capsys):
    zm = zoo.build("mlp", "tiny")
    exp = nnforge.explain(zm.model, zm.inputs, quiet=True)
    assert exp.plan is None and not exp.fallback and "nothing falls back" in str(exp)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(zm.model, zm.inputs, str(path), dynamo=True, verbose=False)
    capsys.readouterr()
    assert cli(["explain", str(path), "--target", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "nnforge explain" in out and "linear" in out and "nothing falls back" in out


# ---------------------------------------------------------------------------------------
# concurrency: 8 threads give the serial results
# ---------------------------------------------------------------------------------------


def _threads_match_serial(fast, batches):
    serial = [fast.run([x]) for x in batches]
    start = threading.Barrier(8)

    def call(i):
        if i < 8:
            start.wait()  # the first eight calls start together
        return i, fast.run([batches[i % len(batches)]])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(48)))
    for i, outs in results:
        for got, want in zip(outs, serial[i % len(batches)]):
            np.testing.assert_array_equal(got, want)


def _batches(shape, n=8):
    return [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(n)]


def test_eight_threads_onnxrt():
    zm = zoo.build("vit", "tiny")
    fast = nnforge.compile(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes, progress=False, check=False)
    _threads_match_serial(fast, _batches((2, 3, 32, 32)))


def test_eight_threads_partitioned_and_loaded(tmp_path):
    model = Custom().eval()
    fast = nnforge.compile(model, (torch.randn(2, 6),), progress=False, min_block_size=1)
    assert fast.backend == "onnxrt+torch"
    fast.save(tmp_path / "b")
    _threads_match_serial(nnforge.load(tmp_path / "b"), _batches((2, 6)))


def test_eight_threads_tvm():
    zm = zoo.build("mlp", "tiny")
    fast = nnforge.compile(
        zm.model, zm.inputs, backend="tvm", dynamic_shapes=zm.dynamic_shapes, progress=False, check=False
    )
    assert not fast.artifact.thread_safe  # its VM is not: calls are serialized, results are the serial ones
    _threads_match_serial(fast, _batches(tuple(zm.inputs[0].shape)))


# ---------------------------------------------------------------------------------------
# NaN / Inf inputs propagate like eager; bad calls get named errors
# ---------------------------------------------------------------------------------------


def _with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1)
    flat[1], flat[5], flat[9] = float("nan"), float("inf"), -float("inf")
    return x


@pytest.mark.parametrize("family", ["mlp", "cnn", "vit"])
def test_nan_and_inf_propagate_like_eager(family):
    zm = zoo.build(family, "tiny")
    fast = nnforge.compile(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes, progress=False)
    x = _with_nonfinite(zm.inputs[0])
    with torch.no_grad():
        want = zm.model(x).numpy()
    got = fast(x).numpy()
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-5)


def test_nan_through_max_ops_on_onnxrt():
    """ONNX Runtime's max kernels skip NaN; nnforge's lowering puts it back, as eager torch does."""
    x = torch.tensor([[1.0, float("nan"), 3.0, 0.5], [2.0, 1.0, -float("inf"), 4.0]])

    class MaxOps(torch.nn.Module):
        def forward(self, t):
            return t.amax(dim=1), t.argmax(dim=1), torch.relu(t), t.clamp(min=0.0)

    fast = nnforge.compile(MaxOps(), (x,), progress=False)
    for got, want in zip(fast(x), MaxOps()(x)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_wrong_calls_are_named_errors_on_a_partitioned_model():
    fast = nnforge.compile(Custom(), (torch.randn(2, 6),), progress=False, min_block_size=1)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="input 'x'.*dtype float32"):
        fast(x.double())
    with pytest.raises(ValueError, match="input 'x'.*rank 2"):
        fast(x[0])
    with pytest.raises(ValueError, match="input 'x'.*shape"):
        fast(torch.randn(2, 5))
    with pytest.raises(ValueError, match="expected 1 input"):
        fast(x, x)


def test_sizes_outside_the_exported_range_are_refused():
    """torch.export assumed n >= 3 for x[:3]; a call with n = 2 would read past the end on some backends."""

    class Head(torch.nn.Module):
        def forward(self, x):
            return x[:3] * 2

    n = torch.export.Dim("n", min=3, max=10)
    fast = nnforge.compile(Head(), (torch.randn(5, 4),), dynamic_shapes=({0: n},), progress=False)
    assert fast(torch.randn(4, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"input 'x' axis 0: size 2 is outside the range \[3, 10\] of symbol 'n'"):
        fast(torch.randn(2, 4))
    with pytest.raises(ValueError, match="size 11 is outside"):
        fast(torch.randn(11, 4))
