"""Step caching for diffusion denoisers (nnforge.diffusion): the IR cuts (DeepCache on U-Net skips, FORA block
caching, T-Gate), the stateful compiled denoiser under nnforge's sampling loop and under diffusers pipelines,
and DeepCache's quality on the trained digits model (PSNR vs uncached sampling from the same noise, and a
classifier's agreement with the requested digit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnforge
from nnforge.api import import_model
from nnforge.diffusion import BlockCache, DeepCache, TGate, compile_denoiser, cross_attentions, find_skips, sample
from nnforge.diffusion.compile import denoiser_step
from nnforge.diffusion.metrics import psnr
from nnforge.models.real import dit_tiny, ensure_torchvision, unet2d_tiny

ensure_torchvision()


def graph_of(model, *inputs, conditioning=()):
    with torch.no_grad():
        return import_model(denoiser_step(model, list(conditioning)), inputs)


def test_skips_of_the_digits_unet_and_the_deepcache_cut(digits_diffusion):
    unet = digits_diffusion.unet
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), torch.tensor([1, 2])
    graph = graph_of(unet, x, t, y, conditioning=["class_labels"])
    skips = find_skips(graph)
    # two up blocks' worth per resolution: layers_per_block + 1 concats at 16x16, 8x8 and 4x4
    assert [s.deep.shape[2] for s in skips] == [16, 16, 8, 8, 4, 4]
    assert skips[0].skip.shape == (2, 32, 16, 16)
    cut = nnforge.diffusion.split(graph, DeepCache(branch=0).features(graph))
    ops = cut.cached.op_counts()
    assert "sdpa" not in ops  # the 4x4 self-attention is on the deep path
    assert ops["conv2d"] < graph.op_counts()["conv2d"] // 4
    assert len(cut.full.outputs) == 2 and cut.cached.inputs[-1].shape == skips[0].deep.shape


def test_uncached_and_deepcache_denoisers_follow_eager_sampling(digits_diffusion):
    unet, scheduler = digits_diffusion.unet, digits_diffusion.scheduler("ddim")
    noise, y = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 5, 7])
    eager = sample(unet, scheduler, noise, 10, class_labels=y)
    plain = compile_denoiser(unet, noise, 999, class_labels=y)
    np.testing.assert_allclose(sample(plain, scheduler, noise, 10, class_labels=y), eager, atol=2e-3)
    assert (plain.full_calls, plain.cached_calls) == (10, 0)
    # interval 1 reuses nothing: the full graph every step, same numbers
    every = compile_denoiser(unet, noise, 999, cache=DeepCache(interval=1), class_labels=y)
    np.testing.assert_allclose(sample(every, scheduler, noise, 10, class_labels=y), eager, atol=2e-3)
    assert (every.full_calls, every.cached_calls) == (10, 0)
    cached = compile_denoiser(unet, noise, 999, cache=DeepCache(interval=3), class_labels=y)
    out = sample(cached, scheduler, noise, 10, class_labels=y)
    assert (cached.full_calls, cached.cached_calls) == (4, 6)  # steps 0, 3, 6, 9
    assert 20 < psnr(out, eager) < 80  # close, but not the same computation


def test_ddpm_sampling_draws_the_same_noise_as_eager():
    from diffusers import DDPMScheduler

    unet, noise = unet2d_tiny(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    run = lambda denoiser: sample(
        denoiser, DDPMScheduler(num_train_timesteps=100), noise, 10, generator=torch.Generator().manual_seed(5)
    )
    np.testing.assert_allclose(run(compile_denoiser(unet, noise, 99)), run(unet), atol=1e-4)


def test_deepcache_interval_3_keeps_the_digits_recognisable(digits_diffusion):
    """The issue's target on the real model: 50 DDIM steps, 10 samples of each digit, same noise."""
    m = digits_diffusion
    labels = torch.arange(100) % 10
    noise = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = compile_denoiser(m.unet, noise, 999, class_labels=labels)
    reference = sample(plain, m.scheduler("ddim"), noise, 50, class_labels=labels)
    base = m.agreement(reference, labels)
    assert base >= 0.8, f"uncached samples: the classifier reads only {base:.0%} as the requested digit"
    cached = compile_denoiser(m.unet, noise, 999, cache=DeepCache(interval=3), class_labels=labels)
    out = sample(cached, m.scheduler("ddim"), noise, 50, class_labels=labels)
    assert (cached.full_calls, cached.cached_calls) == (17, 33)
    assert psnr(out, reference) >= 25
    assert m.agreement(out, labels) >= base - 0.03


def test_schedules():
    assert [s for s in range(10) if DeepCache(interval=3).full_steps(10)(s)] == [0, 3, 6, 9]
    nonuniform = [s for s in range(50) if DeepCache(interval=5, schedule="nonuniform").full_steps(50)(s)]
    assert len(nonuniform) == 10 and nonuniform[0] == 0 and nonuniform[-1] == 49
    assert nonuniform[1] - nonuniform[0] < nonuniform[-1] - nonuniform[-2]  # denser at the start
    assert [s for s in range(6) if DeepCache(schedule=(2, 5)).full_steps(6)(s)] == [0, 2, 5]
    assert [s for s in range(6) if TGate(gate=2).full_steps(6)(s)] == [0, 1]
    assert [s for s in range(6) if BlockCache(interval=2).full_steps(6)(s)] == [0, 2, 4]
    with pytest.raises(nnforge.NnforgeError, match="interval must be >= 1"):
        DeepCache(interval=0)
    with pytest.raises(nnforge.NnforgeError, match="schedule is"):
        DeepCache(schedule="sometimes")


def test_ddim_pipeline_runs_the_compiled_unet():
    from diffusers import DDIMPipeline, DDIMScheduler

    unet = unet2d_tiny()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100))
    run = lambda: pipe(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="np"
    )
    eager = run().images
    pipe.unet = compile_denoiser(unet, torch.randn(2, 3, 8, 8), 50)
    np.testing.assert_allclose(run().images, eager, atol=1e-4)
    pipe.unet = cached = compile_denoiser(unet, torch.randn(2, 3, 8, 8), 50, cache=DeepCache(interval=2))
    first = run().images
    assert (cached.full_calls, cached.cached_calls) == (3, 3)
    np.testing.assert_array_equal(run().images, first)  # a second run starts afresh: the timestep went back up
    assert (cached.full_calls, cached.cached_calls) == (6, 6)
    assert np.abs(first - eager).max() > 0  # deep features were reused


def test_dit_block_cache_in_the_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    dit = dit_tiny()
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    pipe = DiTPipeline(dit, vae, DDIMScheduler(num_train_timesteps=100))
    run = lambda: pipe([1, 2], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
    eager = run().images
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 1000, 1000])  # classifier-free guidance doubles the batch
    pipe.transformer = compile_denoiser(dit, x, 50, class_labels=y)
    np.testing.assert_allclose(run().images, eager, atol=1e-4)
    pipe.transformer = cached = compile_denoiser(dit, x, 50, cache=BlockCache(interval=3), class_labels=y)
    out = run().images
    assert (cached.full_calls, cached.cached_calls) == (2, 4)
    assert np.abs(out - eager).max() > 0
    # the cached graph runs no attention: every block's branches are reused
    full, light = cached.models(((4, 4, 8, 8), (4,), (4,)))
    assert "attention" in full.graph.op_counts() and "attention" not in light.graph.op_counts()


def test_tgate_freezes_cross_attention():
    from diffusers import DDIMScheduler

    from nnforge.models import real

    step, (x, t, text) = real.unet2d_condition("tiny")
    unet = step.unet
    graph = graph_of(unet, x, t.expand(1), text, conditioning=["encoder_hidden_states"])
    assert len(cross_attentions(graph)) == 4  # one per transformer block (down, mid, two up); self-attention is not
    reference = sample(
        compile_denoiser(unet, x, 10, encoder_hidden_states=text), DDIMScheduler(), x, 10, encoder_hidden_states=text
    )
    gated = compile_denoiser(unet, x, 10, cache=TGate(gate=5), encoder_hidden_states=text)
    out = sample(gated, DDIMScheduler(), x, 10, encoder_hidden_states=text)
    assert (gated.full_calls, gated.cached_calls) == (5, 5)
    assert 15 < psnr(out, reference) < 80
    full, light = gated.models(((1, 4, 16, 16), (1,), (1, 8, 32)))
    attention = lambda g: sum(n.op in ("attention", "sdpa") for n in g.nodes)
    assert (attention(full.graph), attention(light.graph)) == (8, 4)


def test_methods_name_what_the_graph_lacks():
    dit, unet = dit_tiny(), unet2d_tiny()
    dit_graph = graph_of(
        dit, torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1]), conditioning=["class_labels"]
    )
    unet_graph = graph_of(unet, torch.randn(1, 3, 8, 8), torch.tensor([3]))
    with pytest.raises(nnforge.NnforgeError, match="no U-Net skip connections"):
        DeepCache().features(dit_graph)
    with pytest.raises(nnforge.NnforgeError, match="branch 9 out of range, the U-Net has 4 skips"):
        DeepCache(branch=9).features(unet_graph)
    with pytest.raises(nnforge.NnforgeError, match="no cross-attention"):
        TGate().features(dit_graph)
    with pytest.raises(nnforge.NnforgeError, match="no transformer blocks"):
        BlockCache().features(unet_graph)
    denoiser = compile_denoiser(dit, torch.randn(1, 4, 8, 8), 3, class_labels=torch.tensor([1]))
    with pytest.raises(nnforge.NnforgeError, match="missing input.*class_labels"):
        denoiser(torch.randn(1, 4, 8, 8), 3)
    with pytest.raises(nnforge.NnforgeError, match="got encoder_hidden_states too"):
        denoiser(torch.randn(1, 4, 8, 8), 3, class_labels=torch.tensor([1]), encoder_hidden_states=torch.zeros(1))


def test_budget_picks_the_cheapest_setting_within_agreement_and_psnr(digits_diffusion):
    from nnforge.diffusion.budget import search_cache

    m = digits_diffusion
    labels = torch.arange(30) % 10
    noise = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    candidates = [DeepCache(interval=2), DeepCache(interval=3), DeepCache(interval=10)]
    choice = search_cache(
        m.unet,
        noise,
        m.scheduler("ddim"),
        nnforge.Budget(metric="agreement", max_drop=0.05),
        steps=20,
        candidates=candidates,
        classify=m.classify,
        min_psnr=25.0,
        timing="flops",  # deterministic on a busy machine: multiply-adds of the steps as scheduled
        class_labels=labels,
    )
    by_name = {t.name: t for t in choice.trials}
    assert list(by_name) == ["DeepCache(N=10, branch=0)", "DeepCache(N=3, branch=0)", "DeepCache(N=2, branch=0)"]
    # interval 10 on 20 steps reuses the deep feature for 9 steps at a time: far from the uncached samples
    assert by_name["DeepCache(N=10, branch=0)"].psnr < 25 and not by_name["DeepCache(N=10, branch=0)"].within
    assert choice.setting == DeepCache(interval=3) and choice.heldout.within
    assert 2.0 < choice.speedup < 3.0  # 7 full steps of 20, the cached ones about 6x cheaper
    assert "chosen: DeepCache(N=3, branch=0)" in choice.report()
    with pytest.raises(nnforge.NnforgeError, match="needs classify="):
        search_cache(m.unet, noise, m.scheduler("ddim"), nnforge.Budget(metric="agreement"), class_labels=labels)
