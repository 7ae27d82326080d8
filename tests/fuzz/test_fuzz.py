"""Differential fuzzing: random valid graphs through the interpreter, the O1/O2 pipelines, the torch
executor, ONNX Runtime and TVM (static and symbolic shapes), and with NaN/Inf inputs.

The suite runs a bounded, derandomized number of graphs. ``make fuzz N=10000`` runs a long random
campaign (``NNFORGE_FUZZ_N``) and saves every failing graph, shrunk by hypothesis, as JSON under
``tests/fuzz/regressions/``; ``test_regression`` replays those files in every run (a file with an
``xfail`` reason documents a known, unfixed divergence and must keep failing until it is fixed). A long
run writes each graph to ``tests/fuzz/last_case.json`` before running it, so a graph that crashes or
hangs the process (no shrinking possible then) is left there.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz.harness import REGRESSIONS, RUNNERS, case_from_json, case_to_json, check_case, fragile, save_regression
from fuzz.strategies import graphs

LONG = int(os.environ.get("NNFORGE_FUZZ_N", "0") or 0)  # 0: the bounded suite run
LAST_CASE = REGRESSIONS.parent / "last_case.json"  # the graph being run, in a long run (kept if the process dies)


def _campaign(strategy, runners, examples: int):
    """Run ``examples`` graphs; in a long run, save the shrunk failing graphs as regression files."""
    failures: dict = {}
    ran = [0, 0]  # graphs run, graphs skipped as fragile (a discontinuous op too close to its boundary)

    @settings(
        max_examples=LONG or examples,
        deadline=None,
        database=None,
        derandomize=not LONG,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def prop(case):
        if LONG:  # a crash (segfault) takes the process down: the graph that did it is left here
            LAST_CASE.write_text(json.dumps(case_to_json(case.graph, case.inputs, [])))
        ran[0] += 1
        if LONG and ran[0] % 500 == 0:
            print(f"  ... {ran[0]} graphs", flush=True)
        ran[1] += fragile(case.graph, case.inputs)
        found = check_case(case.graph, case.inputs, runners)
        if found:
            # one file per set of failing runners: hypothesis replays its shrunk example last, which overwrites
            failures[tuple(sorted({m.runner for m in found}))] = case_to_json(case.graph, case.inputs, found)
            raise AssertionError("\n".join(map(str, found)))

    try:
        prop()
    finally:
        LAST_CASE.unlink(missing_ok=True)  # (not reached when the process crashes: the graph stays)
        print(
            f"\nfuzz {', '.join(runners)}: {ran[0]} graphs run ({ran[1]} not compared: fragile), "
            f"{len(failures)} failing runner set(s)"
        )
        if LONG:
            for doc in failures.values():
                print(f"saved {save_regression(doc)}")


HOST = ("interp:O1", "interp:O2", "torch", "onnxrt:O0", "onnxrt:O2", "onnxrt:sym")


def test_fuzz_pipelines_torch_and_onnxrt():
    _campaign(graphs(), HOST, 300)


def test_fuzz_nan_and_inf_propagate_like_the_reference():
    _campaign(graphs(nonfinite=True), HOST[:-1], 150)


def test_fuzz_tvm():
    _campaign(graphs(max_ops=6), ("tvm:O2", "tvm:sym"), max(40, LONG // 10) if LONG else 40)


def _regression_params():
    out = []
    for path in sorted(REGRESSIONS.glob("*.json")):
        doc = json.loads(path.read_text())
        marks = [pytest.mark.xfail(reason=doc["xfail"], strict=True)] if doc.get("xfail") else []
        out.append(pytest.param(path, marks=marks, id=path.stem))
    return out


@pytest.mark.parametrize("path", _regression_params())
def test_regression(path):
    doc = json.loads(path.read_text())
    runners = [r for r in doc["runners"] if r in RUNNERS]
    graph, inputs = case_from_json(doc)
    found = check_case(graph, inputs, runners or list(HOST))
    assert not found, "\n".join(map(str, found))
