"""OpenAI-compatible request handling over an ``AsyncEngine``: what ``gpt2rs.serve`` (Ray Serve)
answers on ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/embeddings``.

It follows ``gpt2 serve`` (``src/server/request.rs``, ``routes.rs``, ``chat.rs``): the same fields,
defaults, limits and error shape ``{"error": {"message", "type", "param", "code"}}``, the same SSE
stream (``data: {...}`` events, ``data: [DONE]``), the same chat template, ``finish_reason`` (an
end-of-text token is ``"stop"``) and ``system_fingerprint: "seed-N"`` (choice j of ``n`` samples
with seed + j), so a reply's tokens equal ``gpt2 serve``'s and ``gpt2 generate``'s. The server's
validation is Rust inside the server module, which the wheel does not build; this module checks
the same limits in Python (a field the server reads and this one does not — ``echo``,
``prompt_logprobs``, ``use_beam_search``, ``truncate_prompt_tokens`` — is a 400 naming it, never
ignored). Framework-free: handlers take a parsed body and return a dict or an iterator of SSE
lines, so the Ray deployment stays thin.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import os
import random
import struct
import time
from typing import Any, AsyncIterator, Optional

from .engine import AsyncEngine, EngineClosed, EngineFull

# As `gpt2 serve`'s default `--chat-template`.
DEFAULT_CHAT_TEMPLATE = {
    "message": "{Role}: {content}\n",
    "generation_prompt": "Assistant:",
    "stop": ["\nUser:", "\nSystem:"],
}
CHAT_DEFAULT_MAX_TOKENS = 256
MAX_STOP = 16
MAX_EMBED_INPUTS = 2048
REFUSED = {
    "echo": "echo is not supported by the Ray Serve deployment (use `gpt2 serve`)",
    "prompt_logprobs": "prompt_logprobs is not supported by the Ray Serve deployment (use `gpt2 serve`)",
    "use_beam_search": "use_beam_search is not supported by the Ray Serve deployment (use `gpt2 serve`)",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported by the Ray Serve deployment",
    "suffix": "suffix is not supported",
}
# Structured output runs on `gpt2 serve` and in `Model.generate`, not yet on AsyncEngine: refused
# rather than ignored.
for _k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "guided_whitespace_pattern", "json_schema", "grammar"):
    REFUSED[_k] = f"{_k} (structured output) is not supported by the Ray Serve deployment yet (use `gpt2 serve`)"
del _k


# vLLM's fields that would change the reply and are not implemented (as `gpt2 serve`'s
# `request::UNIMPLEMENTED`): (field, the value that changes nothing, chat only, what instead).
_EMPTY = object()
_ABSENT = object()
UNIMPLEMENTED = [
    ("allowed_token_ids", _EMPTY, False, "use logit_bias, or a guided_choice/guided_regex constraint"),
    ("bad_words", _EMPTY, False, "use logit_bias against their tokens"),
    ("logits_processors", _EMPTY, False, "use logit_bias or a constraint"),
    ("return_tokens_as_token_ids", False, False, "tokens come back as text; /tokenize maps text to ids"),
    ("structural_tag", _ABSENT, False, "use guided_grammar or a JSON schema"),
    ("echo", False, True, "/v1/completions has echo"),
    ("add_generation_prompt", True, True, "send the prompt to /v1/completions"),
    ("continue_final_message", False, True, "send the prompt to /v1/completions"),
    ("chat_template", _ABSENT, True, "the server's template is set by --chat-template"),
    ("chat_template_kwargs", _EMPTY, True, "the server's template takes no arguments"),
    ("documents", _EMPTY, True, "put them in the messages"),
]


def _refuse_unimplemented(body: dict, chat: bool) -> None:
    for field, neutral, chat_only, instead in UNIMPLEMENTED:
        if chat_only and not chat:
            continue
        v = body.get(field)
        if v is None:
            continue
        if neutral is _EMPTY:
            passes = isinstance(v, (list, dict, str)) and len(v) == 0
        elif neutral is _ABSENT:
            passes = False
        else:
            passes = v is neutral
        if not passes:
            raise ApiError.invalid(field, f"{field} is not supported by this server ({instead})")


class ApiError(Exception):
    """An error answered with OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @staticmethod
    def invalid(param: str, message: str, code: Optional[str] = None) -> "ApiError":
        return ApiError(400, message, param, code)

    def kind(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "service_unavailable"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind(), "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict:
        return {"Retry-After": "1"} if self.status == 429 else {}


def parse_object(raw: bytes) -> dict:
    try:
        v = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(v, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(v)}")
    return v


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


# Typed reads: null is the same as absent; a wrong type is a 400 naming the field.
def _get(body: dict, k: str, check, what: str, default=None):
    v = body.get(k)
    if v is None:
        return default
    if not check(v):
        raise ApiError.invalid(k, f"{k} must be {what}, got {_kind(v)}")
    return v


def _bool(body, k, default=None):
    return _get(body, k, lambda v: isinstance(v, bool), "a boolean", default)


def _int(body, k, default=None):
    return _get(body, k, lambda v: isinstance(v, int) and not isinstance(v, bool)
                or (isinstance(v, float) and v.is_integer()), "an integer", default)


def _num(body, k, default=None):
    return _get(body, k, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                "a number", default)


def _within(k: str, v, lo, hi):
    if not (lo <= v <= hi):
        raise ApiError.invalid(k, f"{k} is {v}; expected a number from {lo:g} to {hi:g}")
    return v


def _int_within(k: str, v, lo, hi):
    v = int(v)
    if not (lo <= v <= hi):
        raise ApiError.invalid(k, f"{k} is {v}; expected an integer from {lo} to {hi}")
    return v


def render_chat(messages: Any, template: dict = DEFAULT_CHAT_TEMPLATE) -> str:
    """``messages`` as one prompt, exactly as ``gpt2 serve``'s chat template renders them."""
    if messages is None:
        raise ApiError.invalid("messages", "messages is required")
    if not isinstance(messages, list):
        raise ApiError.invalid("messages", f"messages must be an array, got {_kind(messages)}")
    if not messages:
        raise ApiError.invalid("messages", "messages is an empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError.invalid("messages", f"messages[{i}] must be an object, got {_kind(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise ApiError.invalid("messages", f"messages[{i}].role must be a string, got {_kind(role)}")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for p in content:
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ApiError.invalid("messages", f"messages[{i}].content may hold only text parts")
                parts.append(p["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError.invalid("messages", f"messages[{i}].content must be a string, got {_kind(content)}")
        if role not in ("system", "user", "assistant"):
            raise ApiError.invalid(
                "messages", f'messages[{i}].role is {json.dumps(role)}; expected "system", "user" or '
                '"assistant" (GPT-2 has no tools)')
        cap = role[:1].upper() + role[1:]
        out.append(template["message"].replace("{role}", role).replace("{Role}", cap)
                   .replace("{content}", content))
    return "".join(out) + template["generation_prompt"]


def _refuse_tools(body: dict) -> None:
    for lst, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        v = body.get(lst)
        if v is not None and not (isinstance(v, list) and not v):
            raise ApiError.invalid(lst, f"GPT-2 has no tool calling: {lst} is not supported (send none, or an empty list)")
        c = body.get(choice)
        if c is not None and c not in ("none", "auto"):
            raise ApiError.invalid(choice, f"GPT-2 has no tool calling: {choice} {json.dumps(c)} is not supported (only \"none\")")


class OpenAIFrontend:
    """The OpenAI endpoints over one ``AsyncEngine``."""

    def __init__(self, engine: AsyncEngine, model_name: str, parallel: int, max_queue: int,
                 chat_template: Optional[dict] = None):
        self.engine = engine
        self.tok = engine.model.tokenizer
        self.model_name = model_name
        self.parallel, self.max_queue = parallel, max_queue
        self.n_positions = engine.model.n_positions
        self.vocab = engine.model.vocab_size
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.created = int(time.time())
        # Ids unique across replicas: a random prefix per process, then a counter.
        self._prefix = os.urandom(4).hex()
        self._ids = itertools.count()
        self._token_text: dict = {}

    # -- parsing ---------------------------------------------------------------------------------

    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise ApiError(404, f"the model `{m}` does not exist; this server serves `{self.model_name}`",
                           code="model_not_found")

    def _ids_of(self, v: Any, param: str) -> Optional[list]:
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            bad = next((t for t in v if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise ApiError.invalid(param, f"token {bad} is not an id below {self.vocab}")
            return list(v)
        return None

    def _prompts(self, body: dict) -> list:
        """`prompt` as a list of (ids, text): text, texts, ids or lists of ids."""
        p = body.get("prompt")
        if p is None:
            raise ApiError.invalid("prompt", "prompt is required")
        if isinstance(p, str):
            return [(self.tok.encode(p), p)]
        if isinstance(p, list):
            if not p:
                raise ApiError.invalid("prompt", "prompt is an empty list")
            ids = self._ids_of(p, "prompt")
            if ids is not None:
                return [(ids, self.tok.decode(ids))]
            out = []
            # As `gpt2 serve`: texts, or lists of ids, not both.
            texts = isinstance(p[0], str)
            for item in p:
                if isinstance(item, str) != texts:
                    raise ApiError.invalid("prompt", "prompt must be a string, a list of strings, token ids or lists of ids (not a mix)")
                if isinstance(item, str):
                    out.append((self.tok.encode(item), item))
                    continue
                ids = self._ids_of(item, "prompt")
                if ids is None:
                    raise ApiError.invalid("prompt", "prompt must be a string, a list of strings, token ids or lists of ids")
                out.append((ids, self.tok.decode(ids)))
            return out
        raise ApiError.invalid("prompt", f"prompt must be a string or an array, got {_kind(p)}")

    def _settings(self, body: dict, chat: bool, prompt_lens: list) -> dict:
        """The engine settings of a request (and `n`, `stream`, ...), checked as `gpt2 serve`."""
        for k, msg in REFUSED.items():
            v = body.get(k)
            if v is not None and v is not False and v != "":
                raise ApiError.invalid(k, msg)
        rf = body.get("response_format")
        if rf is not None:
            t = rf.get("type") if isinstance(rf, dict) else None
            if t != "text":
                raise ApiError.invalid("response_format", f"response_format type {json.dumps(t)} is not supported by the Ray Serve deployment yet; only \"text\" is (structured output: use `gpt2 serve`)")
        if chat:
            _refuse_tools(body)
        n = _int(body, "n", 1)
        if n < 1 or n > self.parallel:
            why = "" if n < 1 else f", more than the {self.parallel} sequences this server runs at once (parallel {self.parallel})"
            raise ApiError.invalid("n", f"n is {n}{why}; expected an integer from 1 to {self.parallel}")
        best_of = _int(body, "best_of")
        if best_of is not None and best_of != n:
            raise ApiError.invalid("best_of", f"best_of other than n is only taken with use_beam_search (its beam width); best_of is {best_of}, n is {n}")
        for k in ("length_penalty", "early_stopping"):
            if body.get(k) is not None:
                raise ApiError.invalid(k, f"{k} applies to beam search: send it with use_beam_search: true")
        sequences = len(prompt_lens) * n
        most = self.parallel + self.max_queue
        if sequences > most:
            raise ApiError.invalid("prompt" if len(prompt_lens) > 1 else "n",
                                   f"{len(prompt_lens)} prompts × n = {n} is {sequences} sequences; this server takes at most {most} in one request",
                                   code="too_many_sequences")
        logprobs = None
        if chat:
            top = _int(body, "top_logprobs")
            if top is not None:
                top = _int_within("top_logprobs", top, 0, 20)
            on = _bool(body, "logprobs", False)
            if top is not None and not on:
                raise ApiError.invalid("top_logprobs", "top_logprobs needs logprobs: true")
            if on:
                logprobs = top or 0
        else:
            lp = _int(body, "logprobs")
            if lp is not None:
                logprobs = _int_within("logprobs", lp, 0, 20)
        n_pos = self.n_positions
        longest = max(prompt_lens) if prompt_lens else 1
        if chat:
            k, given = ("max_completion_tokens", _int(body, "max_completion_tokens"))
            if given is None:
                k, given = "max_tokens", _int(body, "max_tokens")
            room = max(n_pos - longest, 1)
            max_tokens = min(CHAT_DEFAULT_MAX_TOKENS, room) if given is None else int(given)
            if max_tokens <= 0:
                raise ApiError.invalid(k, f"{k} is {max_tokens}; expected an integer from 1 to {room} (the context of {n_pos} tokens less the prompt's {longest})")
        else:
            max_tokens = int(_int(body, "max_tokens", 16))
            if max_tokens < 0:
                raise ApiError.invalid("max_tokens", f"max_tokens is {max_tokens}; expected an integer from 1")
            if max_tokens == 0:
                raise ApiError.invalid("max_tokens", "max_tokens 0 generates nothing; it is only useful with echo (the prompt's log-probs)")
        for length in prompt_lens:
            need = length + max_tokens
            if need > n_pos:
                raise ApiError.invalid(
                    "messages" if chat else "prompt",
                    f"this model's maximum context length is {n_pos} tokens, but {need} were requested ({length} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
                    code="context_length_exceeded")
        min_tokens = int(_int(body, "min_tokens", 0))
        if min_tokens < 0 or min_tokens > max_tokens:
            raise ApiError.invalid("min_tokens", f"min_tokens is {min_tokens}; expected at most max_tokens ({max_tokens})")
        stop_token_ids = _get(body, "stop_token_ids", lambda v: isinstance(v, list) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v), "a list of token ids", [])
        bad = next((t for t in stop_token_ids if t >= self.vocab), None)
        if bad is not None:
            raise ApiError.invalid("stop_token_ids", f"stop token {bad} is beyond the vocabulary of {self.vocab}")
        ngram = _int(body, "no_repeat_ngram_size")
        ngram = 0 if ngram is None else _int_within("no_repeat_ngram_size", ngram, 0, n_pos)
        top_k = _int(body, "top_k")
        if top_k is None or top_k == -1:
            top_k = 0
        elif top_k < 0:
            raise ApiError.invalid("top_k", f"top_k is {top_k}; expected -1 (off) or an integer from 0 to {self.vocab}")
        else:
            top_k = _int_within("top_k", top_k, 0, self.vocab)
        seed = _int(body, "seed")
        # A negative seed (which clients written for other servers send) is its two's complement.
        seed = random.getrandbits(63) if seed is None else int(seed) % (1 << 64)

        def num(k, default, lo, hi):
            v = _num(body, k)
            return default if v is None else float(_within(k, v, lo, hi))

        top_p = num("top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise ApiError.invalid("top_p", "top_p is 0; expected a number in (0, 1]")
        rep = num("repetition_penalty", 1.0, 0.0, 100.0)
        if rep == 0.0:
            raise ApiError.invalid("repetition_penalty", "repetition_penalty is 0; expected a number above 0 (1 is off)")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ApiError.invalid("stop", f"stop must be a string or a list of strings, got {_kind(stop)}")
        if len(stop) > MAX_STOP:
            raise ApiError.invalid("stop", f"stop has {len(stop)} strings; at most {MAX_STOP} are taken")
        stop = [s for s in stop if s]
        if chat:
            stop = stop + list(self.chat_template.get("stop", []))
        bias = _get(body, "logit_bias", lambda v: isinstance(v, dict), "an object", {})
        logit_bias = {}
        for key, v in bias.items():
            try:
                t = int(key)
            except ValueError:
                raise ApiError.invalid("logit_bias", f"logit_bias key {json.dumps(key)} is not a token id below {self.vocab}")
            if not 0 <= t < self.vocab:
                raise ApiError.invalid("logit_bias", f"logit_bias key {json.dumps(key)} is not a token id below {self.vocab}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ApiError.invalid("logit_bias", f"logit_bias[{json.dumps(key)}] must be a number, got {_kind(v)}")
            logit_bias[t] = float(_within("logit_bias", v, -100, 100))
        so = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
        include_usage = so.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise ApiError.invalid("stream_options", f"stream_options.include_usage must be a boolean, got {_kind(include_usage)}")
        settings = dict(
            max_tokens=max_tokens,
            temperature=num("temperature", 1.0, 0.0, 2.0),
            top_k=top_k, top_p=top_p, min_p=num("min_p", 0.0, 0.0, 1.0),
            repetition_penalty=rep,
            frequency_penalty=num("frequency_penalty", 0.0, -2.0, 2.0),
            presence_penalty=num("presence_penalty", 0.0, -2.0, 2.0),
            no_repeat_ngram_size=ngram, stop=stop, ignore_eos=_bool(body, "ignore_eos", False),
            stop_token_ids=stop_token_ids, min_tokens=min_tokens,
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
            skip_special_tokens=_bool(body, "skip_special_tokens", False),
            logit_bias=logit_bias or None, logprobs=logprobs,
        )
        return dict(settings=settings, n=n, seed=seed, stream=_bool(body, "stream", False),
                    include_usage=bool(include_usage), logprobs=logprobs)

    def plan(self, body: dict, chat: bool) -> dict:
        """Parse and check a request: a plan `run` executes. Raises ApiError."""
        _refuse_unimplemented(body, chat)
        self._check_model(body)
        if chat:
            text = render_chat(body.get("messages"), self.chat_template)
            prompts = [(self.tok.encode(text), text)]
        else:
            prompts = self._prompts(body)
        # An empty prompt runs from <|endoftext|>, as the engine does.
        lens = [max(len(ids), 1) for ids, _ in prompts]
        p = self._settings(body, chat, lens)
        p.update(chat=chat, prompts=prompts,
                 id=f"{'chatcmpl' if chat else 'cmpl'}-{self._prefix}{next(self._ids):x}")
        return p

    # -- running ---------------------------------------------------------------------------------

    def _text_of(self, token: int) -> str:
        t = self._token_text.get(token)
        if t is None:
            t = self._token_text[token] = self.tok.token_bytes(token).decode("utf-8", "replace")
        return t

    def _submit_all(self, plan: dict, queue: asyncio.Queue) -> list:
        """Every choice (prompt i, sample j → index i*n + j, seed + j) into the engine; events go to
        `queue` as (index, events). On a refusal, those already in are cancelled."""
        loop = asyncio.get_running_loop()
        handles = []
        try:
            for i, (ids, _) in enumerate(plan["prompts"]):
                for j in range(plan["n"]):
                    index = i * plan["n"] + j
                    cb = functools.partial(_put, loop, queue, index)
                    handles.append(self.engine._native.submit(
                        ids, cb, seed=(plan["seed"] + j) % (1 << 64), **plan["settings"]))
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, EngineFull):
                raise ApiError(429, f"the server is busy: {e}", code="queue_full")
            if isinstance(e, EngineClosed):
                raise ApiError(503, f"the server is shutting down: {e}")
            if isinstance(e, (ValueError, TypeError)):
                raise ApiError(400, str(e))
            raise
        return handles

    def _logprob_json(self, plan, acc, token, logprob, top):
        """The chunk's `logprobs` for one token, and the whole reply's accumulation."""
        if plan["logprobs"] is None:
            return None
        if plan["chat"]:
            def entry(t, lp):
                return {"token": self._text_of(t), "logprob": lp, "bytes": list(self.tok.token_bytes(t))}
            v = entry(token, logprob)
            v["top_logprobs"] = [entry(t, lp) for t, lp in (top or [])]
            acc["lp"].append(v)
            return {"content": [v]}
        text = self._text_of(token)
        k = plan["logprobs"]
        top_map = None
        if k > 0:
            top_map = {}
            for t, lp in (top or [])[:k]:
                top_map.setdefault(self._text_of(t), lp)
        one = {"tokens": [text], "token_logprobs": [logprob], "top_logprobs": [top_map],
               "text_offset": [acc["offset"]]}
        acc["offset"] += len(text)
        for key in one:
            acc["lp"].setdefault(key, []).extend(one[key])
        return one

    async def _events(self, plan: dict, queue: asyncio.Queue, handles: list) -> AsyncIterator[tuple]:
        """(index, event) for every choice submitted by `_submit_all`, until all have ended."""
        left = len(handles)
        try:
            while left:
                index, events = await queue.get()
                for ev in events:
                    if ev[0] in ("done", "error"):
                        left -= 1
                    yield index, ev
        finally:
            # A client gone (the task cancelled) frees its slots at the engine's next step.
            for h in handles:
                h.cancel()

    def _chunk(self, plan, index, text, lp, finish) -> dict:
        if plan["chat"]:
            delta = {} if finish is not None and not text else {"content": text}
            return {"id": plan["id"], "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_name, "system_fingerprint": f"seed-{plan['seed']}",
                    "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        return {"id": plan["id"], "object": "text_completion", "created": self.created,
                "model": self.model_name,
                "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]}

    def _new_accs(self, plan):
        k = len(plan["prompts"]) * plan["n"]
        return [{"text": [], "tokens": 0, "finish": None, "prompt": 0,
                 "lp": [] if plan["chat"] else {}, "offset": 0} for _ in range(k)]

    def _fold(self, plan, accs, index, ev):
        """Fold one engine event into the reply; the chunk it makes (or None)."""
        acc = accs[index]
        if ev[0] == "token":
            _, text, token, logprob, top, finish = ev
            acc["tokens"] += 1
            acc["text"].append(text)
            lp = self._logprob_json(plan, acc, token, logprob, top)
            finish = None if finish is None else ("length" if finish == "length" else "stop")
            if finish is not None:
                acc["finish"] = finish
            if not text and finish is None and lp is None:
                return None
            return self._chunk(plan, index, text, lp, finish)
        if ev[0] == "done":
            acc["prompt"] = ev[1].prompt_tokens
            return None
        raise ApiError(500, ev[1])

    def _usage(self, plan, accs):
        # Prompt tokens count once per prompt, as `gpt2 serve`.
        prompt = sum(accs[i * plan["n"]]["prompt"] for i in range(len(plan["prompts"])))
        completion = sum(a["tokens"] for a in accs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def run(self, plan: dict) -> dict:
        """A whole (non-streaming) reply."""
        accs = self._new_accs(plan)
        queue: asyncio.Queue = asyncio.Queue()
        handles = self._submit_all(plan, queue)
        async for index, ev in self._events(plan, queue, handles):
            self._fold(plan, accs, index, ev)
        choices = []
        for i, a in enumerate(accs):
            text = "".join(a["text"])
            lp = a["lp"] if plan["logprobs"] is not None else None
            if plan["chat"]:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None if lp is None else {"content": lp},
                                "finish_reason": a["finish"] or "length"})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp,
                                "finish_reason": a["finish"] or "length"})
        return {"id": plan["id"], "object": "chat.completion" if plan["chat"] else "text_completion",
                "created": self.created, "model": self.model_name,
                "system_fingerprint": f"seed-{plan['seed']}", "choices": choices,
                "usage": self._usage(plan, accs)}

    def run_stream(self, plan: dict) -> AsyncIterator[str]:
        """The SSE lines of a streaming reply. The choices are submitted here, before the first
        line, so that a full engine is still a 429 rather than a broken stream."""
        queue: asyncio.Queue = asyncio.Queue()
        handles = self._submit_all(plan, queue)
        return self._sse(plan, self._events(plan, queue, handles), handles)

    async def _sse(self, plan, events, handles) -> AsyncIterator[str]:
        accs = self._new_accs(plan)
        try:
            if plan["chat"]:
                for i in range(len(accs)):
                    c = self._chunk(plan, i, "", None, None)
                    c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield _sse(c)
            try:
                async for index, ev in events:
                    chunk = self._fold(plan, accs, index, ev)
                    if chunk is not None:
                        yield _sse(chunk)
            except ApiError as e:
                # The stream has answered 200 already: the error is an event before [DONE].
                yield _sse(e.body())
            if plan["include_usage"]:
                yield _sse({"id": plan["id"], "object": "chat.completion.chunk" if plan["chat"] else "text_completion",
                            "created": self.created, "model": self.model_name, "choices": [],
                            "usage": self._usage(plan, accs)})
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                h.cancel()
            await events.aclose()

    async def embeddings(self, body: dict) -> dict:
        self._check_model(body)
        inp = body.get("input")
        if inp is None:
            raise ApiError.invalid("input", "input is required")
        if isinstance(inp, str):
            texts = [self.tok.encode(inp)]
        elif isinstance(inp, list) and inp:
            ids = self._ids_of(inp, "input")
            if ids is not None:
                texts = [ids]
            else:
                texts = []
                strings = isinstance(inp[0], str)
                for x in inp:
                    if isinstance(x, str) != strings:
                        raise ApiError.invalid("input", "input must be a string, a list of strings, token ids or lists of ids (not a mix)")
                    if isinstance(x, str):
                        texts.append(self.tok.encode(x))
                    else:
                        ids = self._ids_of(x, "input")
                        if ids is None:
                            raise ApiError.invalid("input", "input must be a string, a list of strings, token ids or lists of ids")
                        texts.append(ids)
        else:
            raise ApiError.invalid("input", "input must be a non-empty string or array")
        if len(texts) > MAX_EMBED_INPUTS:
            raise ApiError.invalid("input", f"input has {len(texts)} items; at most {MAX_EMBED_INPUTS} are taken")
        for i, t in enumerate(texts):
            if not 1 <= len(t) <= self.n_positions:
                raise ApiError.invalid("input", f"input {i} has {len(t)} tokens; expected 1 to the context of {self.n_positions}")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError.invalid("encoding_format", f"encoding_format {json.dumps(fmt)}; expected \"float\" or \"base64\"")
        dims = _int(body, "dimensions")
        n_embd = None
        pooling = body.get("pooling") or "mean"
        if pooling not in ("mean", "last"):
            raise ApiError.invalid("pooling", f"pooling {json.dumps(pooling)}; expected \"mean\" or \"last\"")
        try:
            vecs = await self.engine.embed(texts, pooling=pooling)
        except EngineFull as e:
            raise ApiError(429, f"the server is busy: {e}", code="queue_full")
        except EngineClosed as e:
            raise ApiError(503, f"the server is shutting down: {e}")
        n_embd = vecs.shape[-1]
        if dims is not None and dims != n_embd:
            raise ApiError.invalid("dimensions", f"dimensions is {dims}; this model's embeddings have {n_embd}")
        data = []
        for i, v in enumerate(vecs):
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v.tolist())).decode()
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(t) for t in texts)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "gpt2"}]}


def _put(loop, queue, index, events):
    # Runs on the engine's thread: hand over to the loop (raises once the loop is closed, which
    # the engine takes as a cancellation).
    loop.call_soon_threadsafe(queue.put_nowait, (index, events))


async def grouped(lines: AsyncIterator[str], interval: int) -> AsyncIterator[str]:
    """SSE lines sent ``interval`` at a time (vLLM's ``stream_interval``): the first at once, so the
    time to first token is unchanged, then groups of ``interval``, and what is left at the end.
    Fewer, larger messages cost less where each message is expensive (a Ray Serve replica ships
    each through its object store to the proxy)."""
    buf: list = []
    first = True
    async for line in lines:
        buf.append(line)
        if first or len(buf) >= interval:
            yield "".join(buf)
            buf.clear()
            first = False
    if buf:
        yield "".join(buf)


def _sse(v: dict) -> str:
    return f"data: {json.dumps(v, separators=(',', ':'), ensure_ascii=False)}\n\n"
