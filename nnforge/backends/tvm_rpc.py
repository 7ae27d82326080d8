"""Tuning on a device farm: MetaSchedule's trials measured on devices registered with a TVM RPC tracker.

``options={"tune": N, "tune_rpc": "HOST:PORT", "tune_key": "KEY"}`` (``nnforge tune --rpc --key``):
candidates are built here, cross-compiled for the key's target and exported as a tar of object
files, which each RPC server links and loads itself (so this host needs no cross linker); MetaSchedule's
``RPCRunner`` asks the tracker for a free device under the key for every measurement, one connection
per device at once. The farm is TVM's own:

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key KEY    # on every device

A device that goes away in the middle of a measurement fails that measurement, not the tune: the
measurement is asked again (``ATTEMPTS`` in all), and the tracker hands it to a device still there, so
its record holds a real time rather than MetaSchedule's mark of a failed run (1e10 s).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from ..errors import NnforgeError
from ..targets import ALIASES, TARGETS

ATTEMPTS = 3  # measurements of one candidate before it counts as failed
SESSION_TIMEOUT_S = 120  # a server ends a session after this long (upload, link, load, time)


@dataclass(frozen=True)
class Farm:
    """Where the devices are: the tracker's address and the key they registered under."""

    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str, key: str) -> "Farm":
        host, sep, port = str(address).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise NnforgeError(f"tune_rpc={address!r}: give the tracker as HOST:PORT, e.g. 127.0.0.1:9190")
        if not key:
            raise NnforgeError("tune_rpc needs tune_key: the key the devices registered under with the tracker")
        return cls(host, int(port), str(key))

    @property
    def config(self) -> "ms.runner.RPCConfig":
        return ms.runner.RPCConfig(
            tracker_host=self.host, tracker_port=self.port, tracker_key=self.key, session_timeout_sec=SESSION_TIMEOUT_S
        )

    def devices(self) -> int:
        """How many servers the tracker lists under the key (busy or free); NnforgeError when it cannot be reached."""
        try:  # a quick look first: TVM's own connect retries for a minute
            socket.create_connection((self.host, self.port), timeout=10).close()
            summary = tvm.rpc.connect_tracker(self.host, self.port).summary()
        except (OSError, RuntimeError) as e:
            raise NnforgeError(f"cannot reach the TVM RPC tracker at {self.host}:{self.port}: {e}") from None
        return sum(s["key"].split(":")[-1] == self.key for s in summary.get("server_info", []))

    def require_devices(self) -> int:
        n = self.devices()
        if not n:
            raise NnforgeError(
                f"no device is registered under key {self.key!r} with the tracker at {self.host}:{self.port} "
                f"(start one: python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key})"
            )
        return n

    def device_threads(self) -> int:
        """The thread count of one device's TVM pool: the num-cores MetaSchedule tunes parallel loops for."""
        self.require_devices()  # the tracker would wait for one forever
        session = self.config.connect_server()
        return int(session.get_function("runtime.NumThreads")())


def farm_from_options(options: dict) -> Farm | None:
    if not options.get("tune_rpc") and not options.get("tune_key"):
        return None
    if not options.get("tune_rpc"):
        raise NnforgeError("tune_key needs tune_rpc: the tracker's HOST:PORT")
    return Farm.parse(options["tune_rpc"], options.get("tune_key"))


def target_of_key(key: str, default: str = "cpu") -> str:
    """The nnforge target a key names by its first word ("arm-rpi4", "aarch64" -> arm), else ``default``."""
    head = str(key).lower().replace("_", "-").split("-")[0]
    name = ALIASES.get(head, head)
    return name if name in TARGETS and name != "wasm" else default


@derived_object
class _RetryFuture(ms.runner.PyRunnerFuture):
    def __init__(self, runner, runner_input, future, attempts: int):
        super().__init__()
        self.runner, self.input, self.future, self.left = runner, runner_input, future, attempts - 1

    def done(self) -> bool:
        return self.future.done()

    def result(self) -> "ms.runner.RunnerResult":
        res = self.future.result()
        while res.error_msg is not None and self.left > 0:  # e.g. the device went away: ask the tracker again
            self.left -= 1
            res = self.runner.run([self.input])[0].result()
        return res


@derived_object
class RetryingRunner(ms.runner.PyRunner):
    """MetaSchedule's RPCRunner, each failed measurement asked again up to ``attempts`` times in all."""

    def __init__(self, farm: Farm, workers: int, attempts: int = ATTEMPTS):
        super().__init__()
        self.inner = ms.runner.RPCRunner(farm.config, max_workers=workers)
        self.attempts = attempts

    def run(self, runner_inputs):
        futures = self.inner.run(runner_inputs)
        return [_RetryFuture(self.inner, i, f, self.attempts) for i, f in zip(runner_inputs, futures)]


def runner(farm: Farm) -> RetryingRunner:
    """One connection per device registered now (MetaSchedule measures that many candidates at once)."""
    return RetryingRunner(farm, workers=farm.require_devices())
