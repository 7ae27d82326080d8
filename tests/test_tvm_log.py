"""TVM's C++ log lines stay off stderr (to the nnforge.tvm logger); its errors and anything else still show."""

from __future__ import annotations

import logging
import os

import pytest
from toolchains import need

import nnforge
from nnforge.backends import tvm_log
from nnforge.models import zoo
from nnforge.runtime import edge

WARNING = "[18:00:14] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving: global"
INFO = "[18:00:14] /project/src/relax/transform/x.cc:12: applied 3 rules"
ERROR = "[18:00:14] /project/src/runtime/module.cc:99: Error: cannot open model.so"


@pytest.mark.parametrize(
    "target, tools",
    [
        ("cpu", ()),
        ("arm", (edge.ARM_CXX, edge.QEMU, "aarch64-sysroot", "aarch64-tvm-runtime")),
        ("wasm", ("wasm-ld", "node")),
    ],
)
def test_a_tvm_build_and_save_print_nothing(target, tools, tmp_path, capfd):
    need(*tools)
    zm = zoo.build("mlp", "tiny")
    capfd.readouterr()
    # checked: the model runs once (a run fills the executable's memory scopes, whose saving TVM logs), then saved
    fast = nnforge.compile(zm.model, zm.inputs, target=target, backend="tvm", progress=False, cache=False)
    fast.save(tmp_path / "bundle")
    assert fast.accuracy["max_rel_error"] <= 1e-4
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert (tmp_path / "bundle" / "manifest.json").is_file()


def test_split_records_keeps_errors_and_foreign_lines():
    text = "\n".join([WARNING, "    continued detail", INFO, ERROR, "Traceback-ish line from elsewhere", ""])
    quiet, shown = tvm_log.split_records(text)
    assert quiet == [WARNING + "\n    continued detail", INFO]
    assert shown == f"{ERROR}\nTraceback-ish line from elsewhere\n"


def test_quiet_logs_tvm_warnings_and_passes_the_rest_through(capfd, caplog):
    with caplog.at_level(logging.DEBUG, logger="nnforge.tvm"), tvm_log.quiet():
        os.write(2, f"{WARNING}\n{ERROR}\n".encode())  # at the file descriptor, as TVM's C++ writes
        os.write(2, b"something else\n")
    err = capfd.readouterr().err
    assert err == f"{ERROR}\nsomething else\n"
    assert [r.getMessage() for r in caplog.records if r.name == "nnforge.tvm"] == [WARNING]


def test_quiet_restores_stderr_when_the_block_raises(capfd):
    with pytest.raises(RuntimeError), tvm_log.quiet():
        os.write(2, f"{ERROR}\n".encode())
        raise RuntimeError("TVM failed")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == f"{ERROR}\nafter\n"
