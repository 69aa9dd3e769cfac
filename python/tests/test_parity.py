"""gpt2rs against transformers' recorded outputs (the Rust tests' tolerances) and the CLI."""

import numpy as np
import pytest

from conftest import FIXTURES, MODELS, cli_json, generate_cases, max_abs_diff, model, reference


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_transformers(name):
    ref = reference(name)
    m = model(name)
    i = 0
    while f"input_ids.{i}" in ref:
        ids = ref[f"input_ids.{i}"].tolist()
        got = m.logits(ids)
        assert got.dtype == np.float32
        assert got.shape == (len(ids), m.vocab_size)
        assert max_abs_diff(got, ref[f"logits.{i}"]) <= 1e-4, (name, i)
        i += 1
    assert i >= 2


@pytest.mark.parametrize("name", FIXTURES)
def test_top_matches_transformers(name):
    ref = reference(name)
    got = model(name).top(ref["input_ids.1"].tolist(), 10)
    assert [g[0] for g in got] == ref["top.ids"].tolist()
    assert max_abs_diff([g[2] for g in got], ref["top.logprobs"]) <= 1e-4
    assert all(isinstance(g[1], str) for g in got)


@pytest.mark.parametrize("name", FIXTURES)
def test_score_matches_transformers(name):
    ref = reference(name)
    ids = ref["score.ids"].tolist()
    got = model(name).score(ids)
    assert got.dtype == np.float32 and got.shape == (len(ids) - 1,)
    assert max_abs_diff(got, ref["score.logprobs"]) <= 1e-4
    # The same text inside a batch (run several per forward pass) gives the same bits.
    batch = model(name).score([ids[:5], ids, ids[3:9]])
    assert np.array_equal(batch[1], got)


def test_batched_score_equals_each_text_alone():
    m = model("full-vocab-f16")
    texts = [
        "Hello world",
        "The tower is 324 metres tall, about the same height as an 81-storey building.",
        "a b",
        "Paris " * 30,
        "Its base is square, measuring 125 metres on each side.",
        "x y z",
    ] * 7
    together = m.score(texts)
    assert len(together) == len(texts)
    for t, got in zip(texts, together):
        alone = m.score(t)
        assert np.array_equal(got, alone), t
        assert len(got) == len(m.tokenizer.encode(t)) - 1


def _ranks(logits, ids):
    """1 + how many logits of each row are strictly above the next token's."""
    target = logits[np.arange(len(ids) - 1), ids[1:]]
    return 1 + (logits[: len(ids) - 1] > target[:, None]).sum(axis=1)


def _entropies(logits):
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1)
    return np.log(s) - (e * z).sum(axis=1) / s


@pytest.mark.parametrize("name", FIXTURES)
def test_score_diagnostics_match_transformers(name):
    """Ranks exactly those of the model's own logits; against transformers' logits, entropies
    within 1e-4 and ranks equal wherever no logit lies within twice the row's measured
    |ours - transformers'| of the target's (there float noise may order them either way)."""
    ref = reference(name)
    m = model(name)
    i = 0
    while f"input_ids.{i}" in ref:
        ids = ref[f"input_ids.{i}"].tolist()
        d = m.score(ids, diagnostics=True)
        assert sorted(d) == ["entropies", "logprobs", "ranks"]
        n = len(ids) - 1
        assert d["ranks"].dtype == np.int64 and d["ranks"].shape == (n,)
        assert d["entropies"].dtype == np.float32 and d["entropies"].shape == (n,)
        assert np.array_equal(d["logprobs"], m.score(ids))
        own = m.logits(ids)
        assert np.array_equal(d["ranks"], _ranks(own, ids))
        want = ref[f"logits.{i}"]
        assert np.abs(d["entropies"] - _entropies(want[:n])).max() <= 1e-4
        noise = 2 * np.abs(own - want).max(axis=1)[:n]
        target = want[np.arange(n), ids[1:]]
        near = (np.abs(want[:n] - target[:, None]) <= noise[:, None]).sum(axis=1) > 1
        exact = ~near
        assert exact.sum() >= 0.95 * n
        assert np.array_equal(d["ranks"][exact], _ranks(want, ids)[exact])
        i += 1
    assert i >= 2


def test_score_diagnostics_of_a_batch_equal_each_text_alone():
    m = model("full-vocab-f16")
    texts = ["Hello world", "The tower is 324 metres tall.", "a b", "Paris " * 30] * 5
    together = m.score(texts, diagnostics=True)
    assert isinstance(together, list) and len(together) == len(texts)
    for t, got in zip(texts, together):
        alone = m.score(t, diagnostics=True)
        for key in ("logprobs", "ranks", "entropies"):
            assert np.array_equal(got[key], alone[key]), (t, key)
        assert np.array_equal(got["logprobs"], m.score(t))
    # Without diagnostics, today's return: arrays.
    assert isinstance(m.score(texts[0], diagnostics=False), np.ndarray)
    assert all(isinstance(a, np.ndarray) for a in m.score(texts))


@pytest.mark.parametrize("name", FIXTURES)
def test_perplexity_matches_transformers(name):
    ref = reference(name)
    m = model(name)
    ids = ref["ppl.ids"].tolist()
    context = m.n_positions
    for stride in (context, context // 2):
        nll, scored, ppl = ref[f"ppl.stride{stride}"].tolist()
        for batch in (1, 3):
            got = m.perplexity(ids, context=context, stride=stride, batch=batch)
            assert (got.tokens, got.scored) == (len(ids), int(scored))
            assert abs(got.perplexity - ppl) / ppl <= 1e-5, (name, stride, batch)
            assert abs(got.nll - nll) <= 1e-5 * nll
    # The defaults are context = n_positions, stride = context.
    default = m.perplexity(ids)
    assert abs(default.perplexity - ref[f"ppl.stride{context}"][2]) / default.perplexity <= 1e-5


def _kwargs(case):
    kw = dict(case["kwargs"])
    out = {"max_tokens": kw.pop("max_new_tokens"), "temperature": 0.0}
    out.update(kw)
    return out


def test_generate_matches_transformers():
    greedy = beams = eos_ended = 0
    for case in generate_cases():
        m = model(case["fixture"])
        kw = _kwargs(case)
        got = m.generate(case["prompt"], **kw)
        got = got if isinstance(got, list) else [got]
        want = case["outputs"]
        assert len(got) == len(want), case
        eos = kw.get("eos_token_id", m.eos_token_id)
        for g, w in zip(got, want):
            assert g.tokens == w["tokens"], case
            ended = w["tokens"][-1] == eos
            eos_ended += ended
            assert g.finish_reason == ("eos" if ended else "length"), case
            if w["score"] is not None:
                assert abs(g.score - w["score"]) < 1e-4, case
        if kw.get("num_beams", 1) > 1:
            beams += 1
        else:
            greedy += 1
    assert greedy >= 10 and beams >= 10 and eos_ended >= 5


def test_generate_a_list_equals_each_prompt_alone():
    m = model("full-vocab-f16")
    prompts = ["Hello", "The tower has three levels for visitors", "", "In 1957"]
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "seed": 11}):
        batch = m.generate(prompts, max_tokens=15, stop=".", **kw)
        assert isinstance(batch, list) and len(batch) == 4
        for p, b in zip(prompts, batch):
            alone = m.generate(p, max_tokens=15, stop=".", **kw)
            assert (b.tokens, b.text, b.logprobs, b.finish_reason) == (
                alone.tokens, alone.text, alone.logprobs, alone.finish_reason)


SAMPLED = [
    ("The tower is", ["--temperature", "1.2", "--top-k", "100", "--top-p", "0.98"],
     {"temperature": 1.2, "top_k": 100, "top_p": 0.98}),
    ("Hello, I am", ["--temperature", "0.8", "--min-p", "0.05", "--repetition-penalty", "1.3"],
     {"temperature": 0.8, "min_p": 0.05, "repetition_penalty": 1.3}),
    ("One two", ["--frequency-penalty", "0.5", "--presence-penalty", "0.4",
                 "--no-repeat-ngram-size", "2"],
     {"frequency_penalty": 0.5, "presence_penalty": 0.4, "no_repeat_ngram_size": 2}),
    ("Stop here", ["--temperature", "0.7", "--stop", "e", "--stop", "zz"],
     {"temperature": 0.7, "stop": ["e", "zz"]}),
    ("", ["--ignore-eos"], {"ignore_eos": True}),
]


@pytest.mark.parametrize("prompt,flags,kwargs", SAMPLED)
@pytest.mark.parametrize("seed", [1, 1234])
def test_seeded_sampling_equals_the_cli(prompt, flags, kwargs, seed):
    fixture = str(MODELS / "full-vocab-f16")
    want = cli_json("generate", "--model", fixture, "--prompt", prompt, "-n", "30",
                    "--seed", str(seed), *flags)
    got = model("full-vocab-f16").generate(prompt, max_tokens=30, seed=seed, **kwargs)
    assert got.seed == want["seed"] == seed
    assert got.tokens == want["tokens"]
    assert got.text == want["text"]
    assert got.finish_reason == want["finish_reason"]
    assert got.prompt_ids == want["prompt_ids"] and got.prompt_tokens == want["prompt_tokens"]
    # The CLI prints each f32 as its shortest decimal: equal once back in f32.
    assert np.array_equal(np.float32(got.logprobs), np.float32(want["logprobs"]))


def test_seeded_sampling_is_pinned():
    # The Rust suite's pinned draw (tests/suite/generation_parity.rs): same RNG, sampler, processors.
    got = model("full-vocab-f16").generate(
        "The tower is", max_tokens=30, temperature=1.2, top_k=100, top_p=0.98, seed=1234)
    assert got.tokens[:8] == [31281, 19517, 47311, 178, 39633, 20246, 15672, 45756]
    other = model("full-vocab-f16").generate(
        "The tower is", max_tokens=30, temperature=1.2, top_k=100, top_p=0.98, seed=1235)
    assert other.tokens != got.tokens


def test_beam_search_equals_the_cli():
    fixture = str(MODELS / "full-vocab-f16")
    want = cli_json("generate", "--model", fixture, "--prompt", "The tower", "-n", "12",
                    "--num-beams", "3", "--num-return-sequences", "2",
                    "--length-penalty", "0.8", "--early-stopping", "never")
    got = model("full-vocab-f16").generate(
        "The tower", max_tokens=12, num_beams=3, num_return_sequences=2,
        length_penalty=0.8, early_stopping="never")
    assert [g.tokens for g in got] == [r["tokens"] for r in want["results"]]
    assert [g.text for g in got] == [r["text"] for r in want["results"]]


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0},
    {"temperature": 0.9, "top_k": 50, "seed": 5},
    {"temperature": 0.0, "stop": [" the", "."]},
    {"temperature": 1.0, "seed": 3, "max_tokens": 40, "ignore_eos": True},
])
def test_stream_equals_generate(kwargs):
    m = model("full-vocab-f16")
    kwargs = {"max_tokens": 25, **kwargs}
    want = m.generate("In 1957, a broadcasting aerial", **kwargs)
    stream = m.stream("In 1957, a broadcasting aerial", **kwargs)
    assert stream.result is None
    pieces = list(stream)
    assert all(pieces), "empty pieces are not handed out"
    assert "".join(pieces) == want.text
    res = stream.result
    assert (res.tokens, res.text, res.finish_reason) == (want.tokens, want.text, want.finish_reason)
    assert next(iter(stream), None) is None


def test_stop_strings_are_never_streamed():
    m = model("full-vocab-f16")
    full = m.generate("In 1957, a broadcasting aerial", max_tokens=25, temperature=0)
    pieces = [m.tokenizer.decode([t]) for t in full.tokens]
    a, b = pieces[3], pieces[4]
    stop = a[-2:] + b[:2]
    streamed = ""
    for piece in m.stream("In 1957, a broadcasting aerial", max_tokens=25, temperature=0,
                          stop=["never matches", stop]):
        streamed += piece
        assert stop not in streamed
    assert streamed == full.text[: full.text.find(stop)]


def test_tokenizer_round_trip_and_batch():
    tok = model("full-vocab-f16").tokenizer
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    texts = ["Hello world", "", "naïve café 🎉", " spaces  and\nlines"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert tok.vocab_size == len(tok) == 50257


def test_model_properties():
    m = model("openai-f32")
    assert (m.dtype, m.device, m.vocab_size, m.n_positions) == ("f32", "cpu", 384, 32)
    q8 = model("full-vocab-f16", "q8", 1)
    assert (q8.dtype, q8.threads) == ("q8", 1)
    assert "q8" in repr(q8) or "q8" in q8.describe()
