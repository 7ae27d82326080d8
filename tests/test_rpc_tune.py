"""Tuning over TVM RPC: a real tracker and two real servers on this host (subprocesses on free ports);
one server is stopped in the middle of the tune, which goes on on the other and loses no record."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nnforge
from nnforge.backends import tvm as tb
from nnforge.backends import tvm_rpc, tvm_tune
from nnforge.cli import main as cli_main
from nnforge.errors import NnforgeError
from nnforge.targets import get_target

KEY = "nnforge-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(*args) -> subprocess.Popen:
    # a session of its own: the server forks a process per RPC session, stopped with it by killpg
    return subprocess.Popen(
        [sys.executable, "-m", *args], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def farm():
    port = free_port()
    procs = [spawn("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))]
    try:
        f = tvm_rpc.Farm("127.0.0.1", port, KEY)
        for _ in range(120):  # the tracker takes a few seconds to import TVM and listen
            try:
                f.devices()
                break
            except NnforgeError:
                time.sleep(0.5)
        for _ in range(2):
            p = free_port()
            procs.append(
                spawn(
                    "tvm.exec.rpc_server",
                    *("--host", "127.0.0.1", "--port", str(p), "--port-end", str(p + 50)),
                    *("--tracker", f"127.0.0.1:{port}", "--key", KEY),
                )
            )
        for _ in range(240):
            if f.devices() == 2:
                break
            time.sleep(0.5)
        assert f.devices() == 2, "the two RPC servers did not register with the tracker"
        yield f, procs[1:]
    finally:
        for p in procs:
            stop(p)


def test_farm_options_are_checked(farm):
    f, _ = farm
    with pytest.raises(NnforgeError, match="HOST:PORT"):
        tvm_rpc.Farm.parse("localhost", KEY)
    with pytest.raises(NnforgeError, match="tune_key"):
        tvm_rpc.Farm.parse(f"127.0.0.1:{f.port}", "")
    with pytest.raises(NnforgeError, match="no device is registered under key 'no-such-board'"):
        tvm_rpc.Farm("127.0.0.1", f.port, "no-such-board").require_devices()
    with pytest.raises(NnforgeError, match="cannot reach the TVM RPC tracker"):
        tvm_rpc.Farm("127.0.0.1", free_port(), KEY).devices()
    assert tvm_rpc.target_of_key("aarch64-rpi4") == "arm" and tvm_rpc.target_of_key("arm") == "arm"
    assert tvm_rpc.target_of_key("x86-farm") == "cpu" and tvm_rpc.target_of_key(KEY) == "cpu"
    # an aarch64 farm's records stay apart from this host's (MetaSchedule matches records by kernel alone)
    arm, cpu = (tvm_tune.tune_target(tb.tvm_target(get_target(t), {})) for t in ("arm", "cpu"))
    assert tvm_tune.db_dir("/db", arm) == Path("/db/aarch64-linux-gnu") and tvm_tune.db_dir("/db", cpu) == Path("/db")


def test_cli_tune_names_a_key_without_devices(farm, tmp_path, capsys):
    f, _ = farm
    model = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),), str(model), dynamo=True, verbose=False)
    rc = cli_main(
        ["tune", str(model), "--trials", "4", "--rpc", f"127.0.0.1:{f.port}", "--key", "nobody"]
        + ["--db", str(tmp_path / "db"), "-o", str(tmp_path / "bundle")]
    )
    assert rc == 2 and "no device is registered under key 'nobody'" in capsys.readouterr().err


def test_tune_on_the_farm_survives_a_server_stopped_mid_tune(farm, tmp_path):
    f, servers = farm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU()).eval()
    x = torch.randn(64, 256)
    stopped = threading.Event()

    def progress(stage: str) -> None:
        # after the first measured batch, one of the two devices goes away for good
        if stage.startswith("tuning: ") and "/8 trials" in stage and not stage.startswith("tuning: 0/"):
            if not stopped.is_set():
                stop(servers[0])
                stopped.set()

    db = tmp_path / "db"
    options = {"tune_rpc": f"127.0.0.1:{f.port}", "tune_key": KEY, "tune_db": str(db), "progress": progress}
    cm = nnforge.compile(model, (x,), backend="tvm", tune=8, options=options, check=False, cache=False)
    assert stopped.is_set() and f.devices() == 1
    with torch.no_grad():
        np.testing.assert_allclose(cm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-3)
    tuning = cm.artifact.meta["tuning"]
    records = tvm_tune.open_db(db).get_all_tuning_records()
    # every trial measured landed as a record, each a real time from a device (a failed run would show 1e10)
    assert len(records) >= 8
    assert all(r.run_secs and all(0 < float(t) < 1 and math.isfinite(float(t)) for t in r.run_secs) for r in records)
    assert tuning["trials"] == len(records) and tuning["tuned"] >= 1
