"""python/examples/ray_score.py and ray_generate.py on a local Ray equal a plain loop, document by
document. Skipped when ray is not installed (CI installs it)."""

import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import MODELS, REPO, model

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

FIX = "full-vocab-f16"  # the gpt2 vocabulary, a context of 64


def example(name):
    path = REPO / "python" / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(n=300):
    words = ("the tower is tall and its base is square while Paris has many visitors "
             "during summer 1889 engineers built iron lattice").split()
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        # Mostly short texts (scored in groups), some past the context (strided perplexity),
        # and a few that cannot be scored at all.
        k = int(rng.choice([0, 1, 3, 10, 25, 40, 90, 200], p=[.02, .02, .1, .3, .26, .2, .06, .04]))
        docs.append({"id": i, "text": " ".join(rng.choice(words, size=k))})
    return docs


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def plain_loop(m, text):
    """One document at a time, without the example's code: tokens, scored, nll, perplexity."""
    ids = m.tokenizer.encode(text)
    if len(ids) < 2:
        return len(ids), 0, 0.0, math.nan
    if len(ids) <= m.n_positions:
        lp = m.score(text)
        nll, scored = -float(np.sum(lp, dtype=np.float64)), len(lp)
    else:
        p = m.perplexity(text)
        nll, scored = p.nll, p.scored
    return len(ids), scored, nll, math.exp(nll / scored)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_ray_score_equals_a_plain_loop(local_ray, tmp_path, fmt):
    docs = corpus()
    if fmt == "jsonl":
        src = tmp_path / "corpus.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        import pyarrow as pa

        src = tmp_path / "corpus.parquet"
        pq.write_table(pa.Table.from_pylist(docs), src)
    out = tmp_path / "scores"
    mod = example("ray_score")
    # Ray 2.60 lists Parquet files in a task that takes a whole CPU: leave it one.
    replicas = "2" if fmt == "jsonl" else "1"
    args = mod.parse(["--input", str(src), "--output", str(out), "--model", str(MODELS / FIX),
                      "--replicas", replicas, "--threads", "1", "--batch-size", "32"])
    mod.build(local_ray, args).write_parquet(str(out), ray_remote_args=mod.IO)
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(len(docs)))
    assert "text" not in rows[0]
    m = model(FIX)
    kinds = set()
    for r in rows:
        want = plain_loop(m, docs[r["id"]]["text"])
        got = (r["tokens"], r["scored"], r["nll"], r["perplexity"])
        assert got[:3] == want[:3], (r["id"], got, want)
        assert got[3] == want[3] or (math.isnan(got[3]) and math.isnan(want[3])), (got, want)
        kinds.add("unscored" if want[1] == 0 else "short" if want[0] <= m.n_positions else "long")
    assert kinds == {"unscored", "short", "long"}


def test_ray_generate_equals_a_plain_loop(local_ray, tmp_path):
    prompts = [{"id": i, "prompt": p} for i, p in enumerate(
        ["The tower", "Hello, I am", "In 1957", "Paris is", "", "One two three"] * 5)]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "gen"
    example("ray_generate").main([
        "--input", str(src), "--output", str(out), "--model", str(MODELS / FIX),
        "--max-tokens", "12", "--temperature", "0.8", "--seed", "7", "--replicas", "2",
        "--batch-size", "4"])
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in rows) == list(range(len(prompts)))
    m = model(FIX)
    for r in rows:
        want = m.generate(r["prompt"], max_tokens=12, temperature=0.8, seed=7, truncate_prompt=True)
        assert (r["generated"], r["generated_tokens"], r["finish_reason"]) == (
            want.text, len(want.tokens), want.finish_reason)


def test_ray_activations_equal_a_plain_loop(local_ray, tmp_path):
    docs = corpus(60)
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "acts"
    mod = example("ray_activations")
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    args = mod.parse(["--input", str(src), "--output", str(out), "--model", str(MODELS / FIX),
                      "--sites", ",".join(sites), "--context", "32", "--replicas", "2",
                      "--threads", "1", "--batch-size", "8"])
    mod.build(local_ray, args).write_parquet(str(out), ray_remote_args=mod.IO)
    rows = local_ray.data.read_parquet(str(out)).take_all()
    m = model(FIX)
    by_doc = {}
    for r in rows:
        by_doc.setdefault(r["id"], []).append(r)
    want_tokens = 0
    for d in docs:
        ids = m.tokenizer.encode(d["text"])
        want_tokens += len(ids)
        got = sorted(by_doc.get(d["id"], []), key=lambda r: r["position"])
        assert [r["token"] for r in got] == ids, d["id"]
        for start in range(0, len(ids), 32):
            w = ids[start:start + 32]
            _, cache = m.run_with_cache(w, sites, logits=False)
            for name in sites:
                stacked = np.stack([r[name] for r in got[start:start + len(w)]])
                assert np.array_equal(stacked, cache[name]), (d["id"], name)
    assert len(rows) == want_tokens
