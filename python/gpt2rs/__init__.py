"""gpt2rs: GPT-2 inference by the Rust ``gpt2`` engine, with outputs that match Hugging Face
transformers (``GPT2LMHeadModel``, ``GPT2TokenizerFast``).

>>> from gpt2rs import Model
>>> model = Model.from_pretrained("gpt2")            # a directory, the HF cache, or a download
>>> model.generate("Hello, I'm a language model,", max_tokens=20, temperature=0).text
>>> model.score(["The cat sat on the mat."])          # per-token log-probs, one array per text
>>> model.perplexity(open("wiki.test.raw").read(), stride=512).perplexity
>>> logits, cache = model.run_with_cache("The cat sat", ["blocks.*.hook_resid_post"])
>>> model.embed(["first text", "second text"])      # (2, n_embd), unit length

The engine runs with the GIL released: one model can serve several Python threads, and each
model has its own thread pool (``threads=``). ``AsyncEngine`` batches many asyncio requests on one
model (continuous batching); ``gpt2rs.serve`` deploys it on Ray Serve behind an OpenAI-compatible API.
"""

from ._gpt2rs import (
    MAX_THREADS,
    GenerationResult,
    Model,
    Perplexity,
    Stream,
    Tokenizer,
    __version__,
)
from .engine import AsyncEngine, AsyncStream, EngineClosed, EngineFull, Token

__all__ = [
    "MAX_THREADS",
    "AsyncEngine",
    "AsyncStream",
    "EngineClosed",
    "EngineFull",
    "Token",
    "GenerationResult",
    "Model",
    "Perplexity",
    "Stream",
    "Tokenizer",
    "__version__",
]
