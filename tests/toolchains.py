"""The arm and wasm toolchains (cross compiler, qemu, aarch64 TVM runtime, node, onnxruntime-web, wasm-ld).

``make test`` installs them (scripts/install_toolchains.sh), so a test that needs a missing one fails and
names it. Where they cannot be installed, NNFORGE_ALLOW_MISSING_TOOLCHAINS=1 turns those failures into skips.
"""

from __future__ import annotations

import os

import pytest

from nnforge.runtime import edge


def need(*tools: str) -> None:
    """Fail (skip with NNFORGE_ALLOW_MISSING_TOOLCHAINS=1) unless every tool of ``edge.toolchain_status()`` is there."""
    status = edge.toolchain_status()
    missing = [t for t in tools if status[t] is None]
    if missing:
        msg = (
            f"missing {', '.join(missing)}: run scripts/install_toolchains.sh "
            "(or set NNFORGE_ALLOW_MISSING_TOOLCHAINS=1 to skip the tests that need it)"
        )
        if os.environ.get("NNFORGE_ALLOW_MISSING_TOOLCHAINS") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
