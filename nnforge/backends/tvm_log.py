"""TVM's C++ log lines, kept off the terminal.

TVM's ``LOG(WARNING)`` / ``LOG(INFO)`` write straight to ``std::cerr`` with no level to set at run time
(TVM 0.27's ``tvm/runtime/logging.h``: only ``TVM_LOG_DEBUG`` gates the verbose ``VLOG``/``DLOG``; the
rest is fixed when TVM is compiled). Saving a Relax executable alone prints one
``[hh:mm:ss] .../vm/executable.cc:276: Warning: Scope Saving: ...`` line per memory scope, on every
save, which says nothing to the user. ``tvm_log.quiet()`` points file descriptor 2 at a temporary file
while a TVM call runs, then sends TVM's info and warning records to the ``nnforge.tvm`` logger (at
DEBUG: ``logging.getLogger("nnforge.tvm")`` shows them) and writes everything else (TVM's errors,
anything not in TVM's log format) back to stderr, so nothing real is lost.

File descriptors are per process: captures are serialized by a lock, and a line another thread writes
to stderr meanwhile is passed on too. Wrap only TVM's own calls, never a rich status line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

LOGGER = logging.getLogger("nnforge.tvm")
# "[18:00:14] /project/src/runtime/vm/executable.cc:276: Warning: Scope Saving: global"; INFO has no level word
_RECORD = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] \S+:\d+: (?:(Debug|Warning|Error): )?")
_lock = threading.RLock()


def split_records(text: str) -> tuple[list[str], str]:
    """TVM's info/warning/debug records (with their indented continuation lines), and the rest to show."""
    quiet: list[list[str]] = []
    shown: list[str] = []
    in_quiet = False  # whether the line before belongs to a quiet record
    for line in text.splitlines():
        m = _RECORD.match(line)
        if m is not None:
            in_quiet = m.group(1) != "Error"
            if in_quiet:
                quiet.append([line])
            else:
                shown.append(line)
        elif in_quiet and line.startswith((" ", "\t")):
            quiet[-1].append(line)
        else:
            in_quiet = False
            shown.append(line)
    return ["\n".join(r) for r in quiet], "".join(f"{ln}\n" for ln in shown)


@contextlib.contextmanager
def quiet():
    """Run the block with fd 2 captured; TVM's info and warnings go to the ``nnforge.tvm`` logger."""
    with _lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to keep quiet
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                records, rest = split_records(sink.read().decode(errors="replace"))
                for record in records:
                    LOGGER.debug("%s", record)
                if rest:
                    sys.stderr.write(rest)
                    sys.stderr.flush()
