"""Real architectures from their own libraries (timm, transformers, diffusers), with random weights.

Each builder returns ``(model, example_inputs)``: the library's real class in eval mode, built from a
config, and inputs for it. ``size="tiny"`` shrinks the configs (few layers, small widths, 32x32 images,
short sequences) so the tests that compile every model on every backend stay fast; ``size="bench"``
keeps each architecture's real widths and depths at batch 1 (images 224x224, sequences of 128).

No weights are downloaded: everything is built from configs. ``ZOO`` lists the builders by name.
"""

from __future__ import annotations

from typing import Callable

import torch

SIZES = ("tiny", "bench")


# ---------------------------------------------------------------------------------------
# torchvision without its C++ ops: timm imports torchvision, whose CPU wheel does not exist on PyPI
# ---------------------------------------------------------------------------------------

_TORCHVISION_LIB = None  # the torch.library that defines torchvision's op schemas (kept alive)


def _nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (what torchvision::nms computes), for the op schema's CPU kernel."""
    order, keep = scores.argsort(descending=True), []
    x1, y1, x2, y2 = dets.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    while order.numel():
        i, order = order[0], order[1:]
        keep.append(i)
        w = (torch.minimum(x2[i], x2[order]) - torch.maximum(x1[i], x1[order])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[order]) - torch.maximum(y1[i], y1[order])).clamp(min=0)
        inter = w * h
        order = order[inter / (area[i] + area[order] - inter) <= iou_threshold]
    return torch.stack(keep) if keep else torch.empty(0, dtype=torch.int64)


def _has_op(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision() -> None:
    """Make ``import torchvision`` work beside the CPU torch (needed by timm, and by transformers once
    torchvision is installed). PyPI's torchvision is a CUDA build whose C++ ops do not load next to the CPU
    torch, and its import fails with "operator torchvision::nms does not exist": define the op schemas it
    checks (with a plain CPU nms) before the first import. Idempotent; does nothing without torchvision."""
    global _TORCHVISION_LIB
    import importlib.util
    import sys

    if _TORCHVISION_LIB is not None or "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    if not _has_op("torchvision", "nms"):  # else a working torchvision already defined it
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _nms, "CPU")
        _TORCHVISION_LIB = lib
    import torchvision.extension

    torchvision.extension._has_ops = lambda: True


# ---------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------


def _timm(name: str, tiny: dict, tiny_hw: int = 32) -> Callable:
    """A builder of timm model ``name``: at "tiny" with the ``tiny`` overrides, at "bench" as timm defines it."""

    def build(size: str = "tiny"):
        import timm

        kwargs = tiny if size == "tiny" else {}
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        hw = tiny_hw if size == "tiny" else 224
        return model, (torch.randn(1, 3, hw, hw),)

    build.__doc__ = f"timm {name}"
    return build


resnet50 = _timm("resnet50", {"num_classes": 10, "layers": [1, 1, 1, 1]})
mobilenetv3 = _timm("mobilenetv3_small_100", {"num_classes": 10})
efficientnet_b0 = _timm("efficientnet_b0", {"num_classes": 10, "drop_rate": 0.0})
convnext_t = _timm("convnext_tiny", {"num_classes": 10, "depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)})
vit_s16 = _timm(
    "vit_small_patch16_224", {"num_classes": 10, "img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}
)
swin_t = _timm(
    "swin_tiny_patch4_window7_224",
    {"num_classes": 10, "img_size": 56, "depths": (1, 1), "num_heads": (2, 4), "embed_dim": 32, "window_size": 7},
    tiny_hw=56,
)
regnety = _timm("regnety_002", {"num_classes": 10})


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------

_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)


def _tokens(size: str, vocab: int) -> tuple:
    seq = 8 if size == "tiny" else 128
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    mask = torch.ones(1, seq, dtype=torch.int64)
    mask[:, -2:] = 0  # padding at the end: the mask builders' indexing and where() are exercised
    return ids, mask


def bert(size: str = "tiny"):
    """transformers BertModel (bench: bert-base shape)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**_TINY_TEXT) if size == "tiny" else BertConfig()
    model = BertModel(cfg, add_pooling_layer=False).eval()
    return model, _tokens(size, cfg.vocab_size)


def distilbert(size: str = "tiny"):
    """transformers DistilBertModel (bench: distilbert-base shape)."""
    from transformers import DistilBertConfig, DistilBertModel

    if size == "tiny":
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=128)
    else:
        cfg = DistilBertConfig()
    return DistilBertModel(cfg).eval(), _tokens(size, cfg.vocab_size)


def gpt2(size: str = "tiny"):
    """transformers GPT2Model (bench: gpt2 small shape), no KV cache."""
    from transformers import GPT2Config, GPT2Model

    if size == "tiny":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, use_cache=False)
        cfg.bos_token_id = cfg.eos_token_id = 0
    else:
        cfg = GPT2Config(use_cache=False)
    return GPT2Model(cfg).eval(), _tokens(size, cfg.vocab_size)[:1]


def llama(size: str = "tiny"):
    """transformers LlamaModel (bench: SmolLM2-135M shape), no KV cache."""
    from transformers import LlamaConfig, LlamaModel

    if size == "tiny":
        cfg = LlamaConfig(**_TINY_TEXT, num_key_value_heads=1, max_position_embeddings=64, use_cache=False)
    else:
        cfg = LlamaConfig(
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            use_cache=False,
        )
    return LlamaModel(cfg).eval(), _tokens(size, cfg.vocab_size)[:1]


def t5_encoder(size: str = "tiny"):
    """transformers T5EncoderModel (bench: t5-small shape)."""
    from transformers import T5Config, T5EncoderModel

    if size == "tiny":
        cfg = T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=128)
    else:
        cfg = T5Config()
    return T5EncoderModel(cfg).eval(), _tokens(size, cfg.vocab_size)


def clip_vision(size: str = "tiny"):
    """transformers CLIPVisionModel (bench: ViT-B/32 shape)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if size == "tiny":
        cfg = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    else:
        cfg = CLIPVisionConfig()
    return CLIPVisionModel(cfg).eval(), (torch.randn(1, 3, cfg.image_size, cfg.image_size),)


def whisper_encoder(size: str = "tiny"):
    """transformers WhisperEncoder (bench: whisper-tiny shape), on a log-mel spectrogram."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if size == "tiny":
        cfg = WhisperConfig(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
        )
    else:
        cfg = WhisperConfig(
            d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80
        )
    frames = 2 * cfg.max_source_positions
    return WhisperEncoder(cfg).eval(), (torch.randn(1, cfg.num_mel_bins, frames),)


# ---------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------


def unet2d_tiny(add_attention: bool = True):
    """diffusers UNet2DModel, 8x8x3, two levels, random weights: the smallest unconditioned denoiser (with
    ``add_attention=False`` it has no self-attention at all)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=add_attention,
    ).eval()


def dit_tiny(num_layers: int = 3, sample_size: int = 8):
    """diffusers DiTTransformer2DModel, class-conditional, 2 heads of 16, patch 2 on 4-channel latents, random
    weights: the smallest DiT (``sample_size`` 16 gives 64 tokens)."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=4,
    ).eval()


def unet2d_condition(size: str = "tiny"):
    """diffusers UNet2DConditionModel: one denoising step (latents, timestep, text embeddings)."""
    from diffusers import UNet2DConditionModel

    if size == "tiny":
        cfg = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        hw, text, dim = 16, 8, 32
    else:  # a small Stable-Diffusion-shaped U-Net at 32x32 latents (256x256 images)
        cfg = dict(
            sample_size=32,
            block_out_channels=(128, 256, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=512,
            attention_head_dim=8,
        )
        hw, text, dim = 32, 77, 512
    model = _UNetStep(UNet2DConditionModel(**cfg)).eval()
    return model, (torch.randn(1, 4, hw, hw), torch.tensor([10], dtype=torch.int64), torch.randn(1, text, dim))


class _UNetStep(torch.nn.Module):
    """The U-Net's noise prediction as a plain tensor (diffusers returns an output dataclass)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, text):
        return self.unet(sample, timestep, encoder_hidden_states=text, return_dict=False)[0]


ZOO: dict[str, Callable] = {
    "resnet50": resnet50,
    "mobilenetv3": mobilenetv3,
    "efficientnet_b0": efficientnet_b0,
    "convnext_t": convnext_t,
    "vit_s16": vit_s16,
    "swin_t": swin_t,
    "regnety": regnety,
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "llama": llama,
    "t5_encoder": t5_encoder,
    "clip_vision": clip_vision,
    "whisper_encoder": whisper_encoder,
    "unet2d_condition": unet2d_condition,
}


def build(name: str, size: str = "tiny"):
    """``(model, example_inputs)`` of zoo model ``name`` at ``size`` ("tiny" or "bench")."""
    if name not in ZOO:
        from ..errors import NnforgeError

        raise NnforgeError(f"unknown real model {name!r}; the zoo has {', '.join(ZOO)}")
    if size not in SIZES:
        from ..errors import NnforgeError

        raise NnforgeError(f"unknown size {size!r}; sizes are {', '.join(SIZES)}")
    ensure_torchvision()  # before transformers or timm import it
    torch.manual_seed(0)
    with torch.no_grad():
        return ZOO[name](size)
