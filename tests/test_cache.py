"""The compile cache's size limit: least-recently-used eviction, hits refreshing, `nnforge cache info`, and
cached models of every target saving again (an arm entry holds a library this process cannot load)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from toolchains import need

import nnforge
from nnforge import cache
from nnforge.cli import main as cli
from nnforge.models import zoo
from nnforge.runtime import edge


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("NNFORGE_CACHE_DIR", str(d))
    monkeypatch.delenv("NNFORGE_CACHE_MAX_BYTES", raising=False)
    return d


def _compile(seed: int, **kwargs):
    zm = zoo.build("mlp", "tiny", seed=seed)  # another seed: other weights, another key
    return zm, nnforge.compile(zm.model, zm.inputs, cache=True, progress=False, **kwargs)


def _age(key: str, seconds_ago: float) -> None:
    """Set an entry's use time explicitly (a file system's mtime may be coarse)."""
    t = time.time() - seconds_ago
    os.utime(cache.cache_dir() / key, (t, t))


def test_parse_size_and_the_default_limit(monkeypatch):
    assert cache.parse_size("2GB") == 2 * 10**9 and cache.parse_size("500 mb") == 5 * 10**8
    assert cache.parse_size("1.5G") == 1_500_000_000 and cache.parse_size("4KiB") == 4096
    assert cache.parse_size("123456") == 123456
    monkeypatch.delenv("NNFORGE_CACHE_MAX_BYTES", raising=False)
    assert cache.max_bytes() == cache.DEFAULT_MAX_BYTES == 2 * 10**9
    for bad in ("lots", "2 parsecs", "-5", "0"):
        with pytest.raises(nnforge.NnforgeError, match="NNFORGE_CACHE_MAX_BYTES"):
            cache.parse_size(bad)


def test_least_recently_used_entries_are_evicted_and_hits_refresh(cache_dir, monkeypatch):
    _, a = _compile(1)
    _, b = _compile(2)
    _age(a.cache_key, 300)
    _age(b.cache_key, 200)
    assert [e.key for e in cache.entries()] == [a.cache_key, b.cache_key]  # least recently used first
    hit = _compile(1)[1]  # a hit makes a the most recently used
    assert hit.from_cache and [e.key for e in cache.entries()] == [b.cache_key, a.cache_key]

    entry = max(e.bytes for e in cache.entries())
    monkeypatch.setenv("NNFORGE_CACHE_MAX_BYTES", str(int(2.5 * entry)))  # room for two entries
    _, c = _compile(3)
    keys = [e.key for e in cache.entries()]
    assert keys == [a.cache_key, c.cache_key]  # b, the least recently used, went
    assert not (cache_dir / b.cache_key).exists()
    assert cache.info().bytes <= 2.5 * entry
    assert not _compile(2)[1].from_cache  # b compiles again, and now a goes
    assert a.cache_key not in [e.key for e in cache.entries()]


def test_an_entry_larger_than_the_limit_is_not_kept(cache_dir, monkeypatch, capfd):
    monkeypatch.setenv("NNFORGE_CACHE_MAX_BYTES", "1KB")
    zm, fast = _compile(4)
    assert "exceeds the cache's limit" in capfd.readouterr().err
    assert cache.info().entries == 0 and fast.cache_key is None
    assert torch.allclose(fast(*zm.inputs), zm.model(*zm.inputs), atol=1e-5)  # the compile itself is fine


def test_cache_info_shows_where_entries_size_limit_and_lru_order(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("NNFORGE_CACHE_MAX_BYTES", "1.5GB")
    _, a = _compile(1)
    _, b = _compile(2, backend="tvm")
    _age(a.cache_key, 7200)
    assert cli(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "2 entries" in out and "of 1500.0 MB" in out
    lines = out.splitlines()
    first = next(k for k, ln in enumerate(lines) if a.cache_key[:12] in ln)
    second = next(k for k, ln in enumerate(lines) if b.cache_key[:12] in ln)
    assert first < second  # least recently used first
    assert "2 h ago" in lines[first] and "cpu / onnxrt" in lines[first] and "cpu / tvm" in lines[second]
    info = cache.info()
    assert info.limit == 1_500_000_000 and info.bytes == sum(e.bytes for e in info.lru) > 0


def test_a_bad_limit_is_named_by_the_cli(cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("NNFORGE_CACHE_MAX_BYTES", "huge")
    assert cli(["cache", "info"]) == 2
    assert "NNFORGE_CACHE_MAX_BYTES='huge' is not a size" in capsys.readouterr().err


def test_an_arm_model_from_the_cache_exports_and_runs(cache_dir, tmp_path):
    """An arm entry's library cannot be loaded here: the hit keeps its bytes, so it saves (and runs) again."""
    need(edge.ARM_CXX, edge.QEMU, "aarch64-sysroot", "aarch64-tvm-runtime")
    zm = zoo.build("mlp", "tiny")
    first = nnforge.export(zm.model, zm.inputs, target="arm", out=tmp_path / "first", cache=True, progress=False)
    again = nnforge.export(zm.model, zm.inputs, target="arm", out=tmp_path / "again", cache=True, progress=False)
    assert (first / "model.so").read_bytes() == (again / "model.so").read_bytes()
    hit = nnforge.compile(zm.model, zm.inputs, target="arm", cache=True, progress=False)
    assert hit.from_cache
    cache.clear()  # a loaded model does not run from its entry's folder, which eviction may remove
    x = zm.inputs[0].numpy()
    want = zm.model(*zm.inputs).detach().numpy()
    np.testing.assert_allclose(hit.run([x])[0], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nnforge.load(again).run([x])[0], want, rtol=1e-4, atol=1e-5)
