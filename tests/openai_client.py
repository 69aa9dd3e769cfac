#!/usr/bin/env python3
"""`gpt2 serve` through the official `openai` Python client: completions (plain, streaming, logprobs,
echo), chat (plain, streaming), models, and errors. Run by .ci/openai-client-test against a server on
the fixture model served as "fixture".

usage: openai_client.py BASE_URL   (e.g. http://127.0.0.1:8080); prints "N passed, N failed".
"""
import sys
import traceback

import openai

BASE = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=60)
MODEL = "fixture"


def test_completion():
    r = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=8, temperature=0, seed=1)
    c = r.choices[0]
    assert isinstance(c.text, str) and c.text, r
    assert c.finish_reason in ("length", "stop"), c.finish_reason
    assert r.usage.prompt_tokens == 4 and 1 <= r.usage.completion_tokens <= 8, r.usage
    again = client.completions.create(model=MODEL, prompt="Hello, I am", max_tokens=8, temperature=0, seed=1)
    assert again.choices[0].text == c.text


def test_seeded_sampling_repeats_and_n():
    kw = dict(model=MODEL, prompt="The weather", max_tokens=10, temperature=0.9, top_p=0.95, seed=42, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_streaming_equals_plain():
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0.7, seed=3)
    plain = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == plain, (text, plain)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("length", "stop")


def test_logprobs_and_echo():
    r = client.completions.create(model=MODEL, prompt="Paris is the capital of", max_tokens=3,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 2 and max(t.values()) >= lp.token_logprobs[i] - 1e-6 for i, t in enumerate(lp.top_logprobs))
    # lm-evaluation-harness's log-likelihood request: echo, max_tokens 0 or 1, logprobs.
    e = client.completions.create(model=MODEL, prompt="Paris is the capital of", max_tokens=0,
                                  temperature=0, echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert e.choices[0].text == "Paris is the capital of"
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == "Paris is the capital of"


def test_chat():
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == m.content, (text, m.content)
    lp = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=2).choices[0].logprobs
    assert lp.content and len(lp.content[0].top_logprobs) == 2


def test_models():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids


def test_errors():
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert "does not exist" in str(e)
    try:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        body = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
        assert body.get("param") == "temperature", e.body
    try:
        client.completions.create(model=MODEL, prompt="word " * 100, max_tokens=2)
        raise AssertionError("a prompt over the context was accepted")
    except openai.BadRequestError as e:
        assert "maximum context length" in str(e)


def main():
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v)]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
            passed += 1
            print(f"PASSED {name}")
        except Exception:  # noqa: BLE001
            failed += 1
            print(f"FAILED {name}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
