"""LLM decoding: a causal LM compiled into a decoder step with an explicit KV cache, a generate loop,
low-bit decode, KV-cache compression and self-speculative decoding. See docs/llm.md.

Modules: spec (read a model into a DecoderSpec), build (the step as IR), surgery (last-row logits,
layer-skipped drafts), runtime (cache buffers, one backend call per step), generate (sampling loop),
compiled (compile_lm, CompiledLM).
"""

from .compiled import CompiledLM, compile_lm
from .generate import Generation, Sampling
from .kv import KVCompress, PromptPrune

__all__ = ["CompiledLM", "Generation", "KVCompress", "PromptPrune", "Sampling", "compile_lm"]
