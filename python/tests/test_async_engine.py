"""gpt2rs.AsyncEngine: many asyncio requests batched on one model by the engine's own thread. Each
result equals Model.generate with the same settings and seed, whatever runs beside it."""

import asyncio
import re
import time

import numpy as np
import pytest

import gpt2rs
from conftest import model

FIX = "full-vocab-f16"  # the gpt2 vocabulary, a context of 64

PROMPTS = ["Hello, I am", "The tower is", "", "Once upon a time there", "x", "a b c d e f"]


def settings(i):
    """A different mix of sampling settings per request."""
    mixes = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=40),
        dict(temperature=1.2, top_p=0.9, repetition_penalty=1.3),
        dict(temperature=0.7, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3),
        dict(temperature=1.0, stop=[" the", "."], no_repeat_ngram_size=2),
        dict(temperature=0.9, ignore_eos=True),
    ]
    return dict(max_tokens=5 + 7 * (i % 5), seed=100 + i, **mixes[i % len(mixes)])


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_equal_model_generate():
    m = model(FIX)
    cases = [(PROMPTS[i % len(PROMPTS)], settings(i)) for i in range(24)]

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=4, max_queue=32)
        # 24 requests in flight over 4 slots: they wait, join and leave the batch at every step.
        results = await asyncio.gather(*(engine.generate(p, **s) for p, s in cases))
        assert await engine.shutdown(5)
        return results

    for (p, s), r in zip(cases, run(main())):
        ref = m.generate(p, **s)
        assert (r.tokens, r.text, r.logprobs, r.finish_reason, r.prompt_ids, r.seed) == (
            ref.tokens, ref.text, ref.logprobs, ref.finish_reason, ref.prompt_ids, ref.seed), (p, s)


def test_shared_prefixes_with_and_without_the_prefix_cache():
    m = model(FIX)
    context = "The committee met on a cold Tuesday morning to decide which of the proposals"
    cases = [(context + end, settings(i)) for i, end in
             enumerate([" won", " lost", " won", " was best", " failed", " won"] * 2)]

    async def main(cache_tokens):
        engine = gpt2rs.AsyncEngine(m, parallel=3, max_queue=32, cache_tokens=cache_tokens)
        first = await asyncio.gather(*(engine.generate(p, **s) for p, s in cases))
        # Again, with every prompt's prefix left behind by the first wave.
        again = await asyncio.gather(*(engine.generate(p, **s) for p, s in cases))
        assert await engine.shutdown(5)
        return first + again

    warm, cold = run(main(4096)), run(main(None))
    for (p, s), w, c in zip(cases * 2, warm, cold):
        ref = m.generate(p, **s)
        assert (w.tokens, w.logprobs, w.text) == (ref.tokens, ref.logprobs, ref.text), (p, s)
        assert (c.tokens, c.logprobs, c.text) == (ref.tokens, ref.logprobs, ref.text), (p, s)


def test_stream_pieces_tokens_and_result():
    m = model(FIX)

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=2)
        s = engine.stream("Hello, I am", max_tokens=12, temperature=0.9, seed=5)
        pieces = [p async for p in s]
        t = engine.stream("Hello, I am", max_tokens=12, temperature=0.9, seed=5, logprobs=3)
        tokens = [x async for x in t.tokens()]
        return pieces, s.result, tokens, t.result

    pieces, result, tokens, result2 = run(main())
    ref = m.generate("Hello, I am", max_tokens=12, temperature=0.9, seed=5)
    assert "".join(pieces) == ref.text and all(pieces)
    assert result.tokens == ref.tokens and result2.tokens == ref.tokens
    assert [t.id for t in tokens] == ref.tokens
    assert [t.logprob for t in tokens] == ref.logprobs
    assert [t.finish_reason for t in tokens][-1] == "length"
    assert all(t.finish_reason is None for t in tokens[:-1])
    # The first token's alternatives: the model's own top 3 after the prompt.
    top = m.top("Hello, I am", 3)
    assert [i for i, _ in tokens[0].top] == [i for i, _, _ in top]
    np.testing.assert_allclose([lp for _, lp in tokens[0].top], [lp for _, _, lp in top], atol=1e-5)


def test_the_loop_stays_free_while_the_engine_computes():
    m = model(FIX)

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=4)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        t0 = time.perf_counter()
        await asyncio.gather(*(engine.generate("The tower is", max_tokens=40, seed=i,
                                               ignore_eos=True) for i in range(8)))
        elapsed = time.perf_counter() - t0
        task.cancel()
        return ticks, elapsed

    ticks, elapsed = run(main())
    # The GIL is released while steps run and events arrive by call_soon_threadsafe: the loop
    # keeps ticking (a blocked loop would tick about once).
    assert ticks >= max(5, int(elapsed / 0.001) // 10), (ticks, elapsed)


def test_back_pressure_cancellation_and_errors():
    m = model(FIX)

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=1, max_queue=1)
        a = engine.stream("The tower is", max_tokens=50, ignore_eos=True, seed=1)
        b = engine.stream("The tower is", max_tokens=50, ignore_eos=True, seed=2)
        # One running and one waiting: a third is refused at once, not queued without bound.
        with pytest.raises(gpt2rs.EngineFull):
            engine.stream("x", max_tokens=5)
        # Leaving a stream early frees its slot; the other runs to its end.
        async for _ in a:
            break
        r = await b.collect()
        assert len(r.tokens) == 50
        for _ in range(100):
            if engine.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["in_flight"] == 0
        # A cancelled task frees its slot too.
        task = asyncio.ensure_future(engine.generate("x", max_tokens=50, ignore_eos=True))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if engine.stats()["in_flight"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["in_flight"] == 0
        # Bad settings raise at the call, before anything runs.
        with pytest.raises(ValueError, match="temperature"):
            engine.stream("x", temperature=-1)
        with pytest.raises(ValueError, match="context"):
            engine.stream("x " * 60, max_tokens=10)
        with pytest.raises(TypeError):
            engine.stream("x", num_beams=2)
        with pytest.raises(ValueError, match="logprobs"):
            engine.stream("x", logprobs=21)
        assert engine.is_alive()
        assert await engine.shutdown(5)
        with pytest.raises(gpt2rs.EngineClosed):
            engine.stream("x", max_tokens=5)

    run(main())


def test_shutdown_drains_then_ends_the_rest():
    m = model(FIX)

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=2)
        short = asyncio.ensure_future(engine.generate("a", max_tokens=3, seed=1))
        await asyncio.sleep(0)
        assert await engine.shutdown(10)
        assert len((await short).tokens) == 3

    run(main())


def test_embed_equals_model_embed():
    m = model(FIX)
    texts = ["The tower is tall", "Hello", "a b c d e f g"]

    async def main():
        engine = gpt2rs.AsyncEngine(m, parallel=2)
        # Embeddings run between the steps of a generation running beside them.
        gen = asyncio.ensure_future(engine.generate("The tower is", max_tokens=30, seed=3))
        many, one, last = await asyncio.gather(
            engine.embed(texts), engine.embed("Hello"), engine.embed(texts, pooling="last"))
        return many, one, last, await gen

    many, one, last, g = run(main())
    assert np.array_equal(many, m.embed(texts))
    assert np.array_equal(one, m.embed("Hello"))
    assert np.array_equal(last, m.embed(texts, pooling="last"))
    assert g.tokens == m.generate("The tower is", max_tokens=30, seed=3).tokens


def test_random_model():
    m = gpt2rs.Model.random("gpt2", dtype="q8", threads=1)
    assert m.vocab_size == 50257 and m.n_positions == 1024 and m.dtype == "q8"
    assert m.tokenizer.encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="gpt2-medium"):
        gpt2rs.Model.random("gpt9")


def test_stream_interval_groups_sse_lines_without_changing_them():
    from gpt2rs.openai_api import OpenAIFrontend, grouped

    async def run(interval):
        engine = gpt2rs.AsyncEngine(model(FIX), parallel=2)
        api = OpenAIFrontend(engine, "m", 2, 4, None)
        plan = api.plan({"prompt": "Hello there", "max_tokens": 9, "stream": True, "seed": 3,
                         "temperature": 0.9}, False)
        lines = api.run_stream(plan)
        if interval > 1:
            lines = grouped(lines, interval)
        out = [re.sub(r'"id":"[^"]*"', '"id":""', m) async for m in lines]  # ids are random
        await engine.shutdown()
        return out

    one = asyncio.run(run(1))
    four = asyncio.run(run(4))
    assert len(one) >= 10 and one[-1] == "data: [DONE]\n\n"  # 9 tokens' events, then [DONE]
    # The first event alone, then 4 at a time, the rest at the end; the bytes unchanged.
    assert four == [one[0]] + ["".join(one[i:i + 4]) for i in range(1, len(one), 4)]
    assert len(four) < len(one)


def test_stream_interval_below_one_is_refused():
    pytest.importorskip("ray")
    pytest.importorskip("fastapi")
    from gpt2rs.serve import parse

    assert parse(["--stream-interval", "4"]).stream_interval == 4
    with pytest.raises(SystemExit):
        parse(["--stream-interval", "0"])
