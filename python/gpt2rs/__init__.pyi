"""Type stubs for gpt2rs (the native module gpt2rs._gpt2rs)."""

from os import PathLike
from typing import (
    Any,
    Dict,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    Tuple,
    Union,
    overload,
)

import numpy as np
import numpy.typing as npt

from .engine import AsyncEngine as AsyncEngine
from .engine import AsyncStream as AsyncStream
from .engine import Token as Token

__version__: str
MAX_THREADS: int

# Token ids: a list (or tuple, numpy array) of ints. ``bytes`` and ``bytearray`` are refused with
# TypeError although they are sequences of ints: they are encoded text (decode them to ``str``).
Ids = Sequence[int]
Prompt = Union[str, Ids]
FinishReason = Literal["length", "eos", "stop"]

class Tokenizer:
    """The model's byte-level BPE tokenizer (identical to ``GPT2TokenizerFast``)."""

    @property
    def vocab_size(self) -> int: ...
    def __len__(self) -> int: ...
    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no BOS added; ``<|endoftext|>`` in the text is the special token)."""
    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, encoded in parallel without the GIL."""
    def decode(self, ids: Ids) -> str:
        """The text of ``ids`` (invalid UTF-8 becomes U+FFFD, as transformers' decode)."""
    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token (a token may hold part of a UTF-8 character)."""

class EngineFull(RuntimeError):
    """``AsyncEngine`` holds ``parallel + max_queue`` requests already: try again later (HTTP 429)."""

class EngineClosed(RuntimeError):
    """``AsyncEngine`` is shut down (or its thread failed): it takes no more requests (HTTP 503)."""

class GenerationResult:
    """One generated sequence."""

    text: str
    """The generated text (without the prompt, a stop string or ``<|endoftext|>``)."""
    tokens: List[int]
    """Generated ids, ``<|endoftext|>`` included when it ended the text."""
    logprobs: List[float]
    """Log-softmax of the raw model logits at each generated token."""
    finish_reason: FinishReason
    prompt_ids: List[int]
    """The prompt's ids as run (after any truncation)."""
    score: Optional[float]
    """Beam search only: the beam's length-penalised score."""
    seed: int
    """The sampling seed used."""
    @property
    def prompt_tokens(self) -> int: ...

class Perplexity:
    """Strided perplexity of a text."""

    perplexity: float
    """exp(nll / scored)."""
    nll: float
    """Total negative log-likelihood of the scored tokens, in nats."""
    tokens: int
    """Tokens in the text."""
    scored: int
    """Tokens scored."""

class Stream(Iterator[str]):
    """Text pieces as they are generated (the GIL is released during each step)."""

    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str: ...
    @property
    def result(self) -> Optional[GenerationResult]:
        """The whole generation once the stream is exhausted, else None."""

class Model:
    """A GPT-2 model run by the Rust engine; safe to share between Python threads."""

    @staticmethod
    def from_pretrained(
        name_or_dir: Union[str, "PathLike[str]"],
        dtype: Literal["f32", "f16", "bf16", "q8"] = "f32",
        device: str = "cpu",
        threads: Optional[int] = None,
        revision: Optional[str] = None,
    ) -> "Model":
        """Load a checkpoint directory or a hub id (``gpt2``, ``owner/name``) as the CLI's --model does."""
    @staticmethod
    def random(
        preset: Literal["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"] = "gpt2",
        dtype: Literal["f32", "f16", "bf16", "q8"] = "f32",
        device: str = "cpu",
        threads: Optional[int] = None,
        seed: int = 1,
    ) -> "Model":
        """Random weights at a released shape with the GPT-2 tokenizer (``gpt2 serve --random``)."""
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def path(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def n_positions(self) -> int: ...
    @property
    def eos_token_id(self) -> int: ...
    def describe(self) -> str: ...
    def logits(self, ids: Prompt) -> npt.NDArray[np.float32]:
        """Logits of every position: float32 ``(len(ids), vocab_size)``."""
    def top(self, prompt: Prompt, k: int = 10) -> List[Tuple[int, str, float]]:
        """The k most likely next tokens, best first: ``(id, token text, logprob)``."""
    @overload
    def score(
        self, texts: str, diagnostics: Literal[False] = False
    ) -> npt.NDArray[np.float32]: ...
    @overload
    def score(
        self, texts: Ids, diagnostics: Literal[False] = False
    ) -> npt.NDArray[np.float32]: ...
    @overload
    def score(
        self, texts: Sequence[Prompt], diagnostics: Literal[False] = False
    ) -> List[npt.NDArray[np.float32]]: ...
    @overload
    def score(self, texts: str, diagnostics: Literal[True]) -> Dict[str, npt.NDArray[Any]]: ...
    @overload
    def score(self, texts: Ids, diagnostics: Literal[True]) -> Dict[str, npt.NDArray[Any]]: ...
    @overload
    def score(
        self, texts: Sequence[Prompt], diagnostics: Literal[True]
    ) -> List[Dict[str, npt.NDArray[Any]]]: ...
    def score(self, texts, diagnostics=False):  # type: ignore[no-untyped-def]
        """Each token's log-prob given its prefix (``len(ids) - 1`` values per text). With
        ``diagnostics=True`` a dict per text: ``logprobs`` (float32, the same values), ``ranks``
        (int64, 1 + how many tokens have a strictly larger logit) and ``entropies`` (float32, the
        entropy of each next-token distribution in nats)."""
    # Research outputs. Site names are TransformerLens's for GPT-2 ("hook_embed",
    # "blocks.3.attn.hook_z", "ln_final.hook_normalized", ...); glob patterns select several.
    @overload
    def run_with_cache(
        self, texts: Prompt, names: Union[None, str, Sequence[str]] = None, logits: bool = True
    ) -> Tuple[Optional[npt.NDArray[np.float32]], Dict[str, npt.NDArray[np.float32]]]: ...
    @overload
    def run_with_cache(
        self, texts: Sequence[Prompt], names: Union[None, str, Sequence[str]] = None,
        logits: bool = True,
    ) -> List[Tuple[Optional[npt.NDArray[np.float32]], Dict[str, npt.NDArray[np.float32]]]]: ...
    def run_with_cache(self, texts, names=None, logits=True):  # type: ignore[no-untyped-def]
        """Logits ``(T, vocab)`` (None with ``logits=False``: the pass then stops after the last
        block a site is in) and the sites ``names`` selects (all when None)."""
    def run_with_patches(
        self, text: Prompt, patches: Dict[str, npt.NDArray[np.floating]]
    ) -> npt.NDArray[np.float32]:
        """Logits ``(T, vocab)`` with each named site replaced by the array given (its shape)."""
    @overload
    def hidden_states(self, texts: Prompt) -> npt.NDArray[np.float32]: ...
    @overload
    def hidden_states(self, texts: Sequence[Prompt]) -> List[npt.NDArray[np.float32]]: ...
    def hidden_states(self, texts):  # type: ignore[no-untyped-def]
        """transformers' ``output_hidden_states``: ``(n_layer + 1, T, n_embd)``, the last after ``ln_f``."""
    @overload
    def attentions(self, texts: Prompt) -> npt.NDArray[np.float32]: ...
    @overload
    def attentions(self, texts: Sequence[Prompt]) -> List[npt.NDArray[np.float32]]: ...
    def attentions(self, texts):  # type: ignore[no-untyped-def]
        """transformers' ``output_attentions``: ``(n_layer, n_head, T, T)``."""
    def embed(
        self,
        texts: Union[Prompt, Sequence[Prompt]],
        pooling: Literal["mean", "last"] = "mean",
        normalize: bool = True,
    ) -> npt.NDArray[np.float32]:
        """The final hidden state pooled per text: ``(N, n_embd)`` for a list, ``(n_embd,)`` for one."""
    def perplexity(
        self,
        text: Prompt,
        context: Optional[int] = None,
        stride: Optional[int] = None,
        batch: Optional[int] = None,
    ) -> Perplexity:
        """Strided perplexity as in transformers' perplexity guide."""
    @overload
    def generate(self, prompt: Prompt, max_tokens: int = 50, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
                 stop: Union[None, str, Sequence[str]] = None, seed: Optional[int] = None,
                 num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: Union[None, bool, Literal["never"]] = None,
                 num_return_sequences: int = 1, eos_token_id: Optional[int] = None,
                 ignore_eos: bool = False, truncate_prompt: bool = False,
                 json_schema: Union[None, str, Dict[str, Any]] = None, json_object: bool = False,
                 regex: Optional[str] = None, choice: Optional[Sequence[str]] = None,
                 grammar: Optional[str] = None,
                 ) -> Union[GenerationResult, List[GenerationResult]]: ...
    @overload
    def generate(self, prompt: Sequence[Prompt], max_tokens: int = 50, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
                 stop: Union[None, str, Sequence[str]] = None, seed: Optional[int] = None,
                 num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: Union[None, bool, Literal["never"]] = None,
                 num_return_sequences: int = 1, eos_token_id: Optional[int] = None,
                 ignore_eos: bool = False, truncate_prompt: bool = False,
                 json_schema: Union[None, str, Dict[str, Any]] = None, json_object: bool = False,
                 regex: Optional[str] = None, choice: Optional[Sequence[str]] = None,
                 grammar: Optional[str] = None,
                 ) -> List[GenerationResult]: ...
    def generate(self, prompt, **kwargs):  # type: ignore[no-untyped-def]
        """Generate as ``gpt2 generate``: temperature 0 is greedy, a seed makes sampling
        reproducible, ``num_beams > 1`` is transformers' beam search. One result for one prompt
        (a list when ``num_return_sequences > 1``), a list for a list of prompts. Structured
        output (one at most; not with beam search): ``json_schema`` (a dict or JSON text),
        ``json_object``, ``regex``, ``choice`` (a list of strings), ``grammar`` (llguidance's
        Lark); a constraint that does not compile raises ValueError."""
    def stream(self, prompt: Prompt, max_tokens: int = 50, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
               repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, no_repeat_ngram_size: int = 0,
               stop: Union[None, str, Sequence[str]] = None, seed: Optional[int] = None,
               eos_token_id: Optional[int] = None, ignore_eos: bool = False,
               truncate_prompt: bool = False,
               json_schema: Union[None, str, Dict[str, Any]] = None, json_object: bool = False,
               regex: Optional[str] = None, choice: Optional[Sequence[str]] = None,
               grammar: Optional[str] = None) -> Stream:
        """Text pieces of one generation as they are produced."""
