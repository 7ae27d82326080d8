"""Layer skipping by block influence, and self-speculative decoding with a layer-skipped draft."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from digits_vit import accuracy

from nnforge.errors import NnforgeError
from nnforge.ir import interpret, verify
from nnforge.models import zoo
from nnforge.passes.blocks import find_blocks, prepare
from nnforge.passes.layers import SkipLayers, SkipLayersPass, block_influence
from nnforge.passes.manager import PassContext
from nnforge.speculative import compare, generate, greedy, self_speculative


@functools.lru_cache(maxsize=None)
def _gpt():
    from nnforge.frontend.torch import import_torch

    zm = zoo.build("gpt", "tiny")
    return prepare(import_torch(zm.model, zm.inputs, dynamic_shapes=zm.dynamic_shapes))


def gpt():
    return _gpt().copy()


def calibration(n=2, seq=12):
    rng = np.random.default_rng(1)
    return [[rng.integers(0, 100, (2, seq)).astype(np.int64)] for _ in range(n)]


def test_block_influence_and_skipping_the_least_influential(digits_vit):
    d = digits_vit
    g = d.graph.copy()
    batches = d.batches(d.x_train[:200])
    info = find_blocks(g)
    influence = block_influence(g, info, batches)
    assert len(influence) == 6 and all(0.0 <= x <= 2.0 for x in influence)
    res = SkipLayersPass(SkipLayers(n=1)).run(g, PassContext(calibration=batches))
    verify(g)
    assert res.stats["skipped"] == [int(np.argmin(influence))]
    assert g.op_counts()["attention"] == 5 and len(find_blocks(g).blocks) == 5
    base = accuracy(np.concatenate([interpret(d.graph, b)[0] for b in d.batches(d.x_test)]), d.y_test)
    got = accuracy(np.concatenate([interpret(g, b)[0] for b in d.batches(d.x_test)]), d.y_test)
    assert base - got <= 0.02  # trained with stochastic depth: the least influential block costs 0.2 points


def test_no_skip_is_exact_and_explicit_consecutive_skips_chain(digits_vit):
    g = gpt()
    x = calibration(1)[0]
    ref = interpret(g, x)[0]
    res = SkipLayersPass(SkipLayers(n=0)).run(g, PassContext())
    assert not res.changed
    np.testing.assert_array_equal(interpret(g, x)[0], ref)
    d = digits_vit
    g = d.graph.copy()
    SkipLayersPass(SkipLayers(blocks=[1, 2])).run(g, PassContext())
    verify(g)
    assert g.op_counts()["attention"] == 4
    assert interpret(g, d.batches(d.x_test[:10])[0])[0].shape == (10, 10)


def test_skip_options_are_checked():
    g = gpt()
    with pytest.raises(NnforgeError, match="at least one"):
        SkipLayersPass(SkipLayers(n=2)).run(g, PassContext(calibration=calibration()))
    with pytest.raises(NnforgeError, match="needs calibration"):
        SkipLayersPass(SkipLayers(n=1)).run(g, PassContext())
    # the settings build their pass, as a pipeline would configure it
    res = SkipLayers(n=1).make_pass().run(g, PassContext(calibration=calibration()))
    assert len(res.stats["skipped"]) == 1 and len(res.stats["influence"]) == 2


def test_speculative_decoding_equals_greedy():
    full, draft = self_speculative(gpt(), skip=1, calibration=calibration())
    assert full.op_counts()["attention"] == 2 and draft.op_counts()["attention"] == 1
    prompt = [5, 17, 3, 42, 8]
    report = compare(full, draft, prompt, max_new_tokens=12, k=3)
    assert report.equal and len(report.speculative.tokens) == 12
    spec = report.speculative
    assert 0.0 <= report.acceptance_rate <= 1.0 and spec.accepted == sum(spec.history)
    assert spec.full_calls == len(spec.history) and spec.full_calls <= 12
    assert "equal to greedy" in str(report)


def test_a_perfect_draft_is_always_accepted_and_runners_can_be_objects():
    g = gpt()

    class Artifact:  # anything with run(list_of_arrays) -> list_of_arrays, like a backend artifact
        calls = 0

        def run(self, inputs):
            Artifact.calls += 1
            return interpret(g, inputs)

    spec = generate(Artifact(), g, [1, 2, 3], max_new_tokens=9, k=4)
    assert spec.tokens == greedy(g, [1, 2, 3], 9).tokens
    assert spec.acceptance_rate == 1.0 and spec.full_calls == 2 == Artifact.calls  # 4 drafts + 1 per pass, then 3 + 1
