"""Activation sites, patching, hidden states, attentions and embeddings against transformers
(recorded by scripts/make_fixtures.py sites: forward hooks on GPT2LMHeadModel's modules)."""

import functools
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import MODELS, model

SITE_FIXTURES = ["openai-f32", "scale-inv-layer", "headdim-24"]


@functools.lru_cache(maxsize=None)
def sites(name):
    path = MODELS / name / "sites.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    return load_file(str(path)), meta


def close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf])
    err = np.abs(got[~inf] - want[~inf]) / np.maximum(1.0, np.abs(want[~inf]))
    return err.size == 0 or err.max() <= tol


@pytest.mark.parametrize("name", SITE_FIXTURES)
def test_run_with_cache_matches_transformers(name):
    ref, _ = sites(name)
    ids = ref["input_ids"].tolist()
    logits, cache = model(name).run_with_cache(ids)
    assert close(logits, ref["logits"])
    recorded = {k[len("site."):]: v for k, v in ref.items() if k.startswith("site.")}
    assert set(cache) == set(recorded)
    for k, v in recorded.items():
        assert cache[k].dtype == np.float32
        assert close(cache[k], v), k


@pytest.mark.parametrize("name", SITE_FIXTURES)
def test_patches_match_transformers_hooks(name):
    ref, meta = sites(name)
    ids = ref["input_ids"].tolist()
    m = model(name)
    cases = [k for k in meta if k.startswith("patch.")]
    assert len(cases) >= 7
    for case in cases:
        got = m.run_with_patches(ids, {meta[case]: ref[f"{case}.value"]})
        assert close(got, ref[f"{case}.logits"]), meta[case]


def test_patching_with_the_cached_value_changes_nothing():
    ref, _ = sites("openai-f32")
    ids = ref["input_ids"].tolist()
    m = model("openai-f32")
    logits, cache = m.run_with_cache(ids, "blocks.1.attn.hook_z")
    assert list(cache) == ["blocks.1.attn.hook_z"]
    same = m.run_with_patches(ids, {"blocks.1.attn.hook_z": cache["blocks.1.attn.hook_z"]})
    assert np.array_equal(same, logits)
    # A head zero-ablated changes the logits.
    z = cache["blocks.1.attn.hook_z"].copy()
    z[:, 0] = 0
    assert not np.array_equal(m.run_with_patches(ids, {"blocks.1.attn.hook_z": z}), logits)


@pytest.mark.parametrize("name", SITE_FIXTURES)
def test_hidden_states_attentions_and_embeddings(name):
    ref, _ = sites(name)
    ids = ref["input_ids"].tolist()
    m = model(name)
    hs = m.hidden_states(ids)
    assert hs.shape == ref["hidden_states"].shape and close(hs, ref["hidden_states"])
    att = m.attentions(ids)
    n_layer = hs.shape[0] - 1
    want = np.stack([ref[f"site.blocks.{l}.attn.hook_pattern"] for l in range(n_layer)])
    assert close(att, want)
    assert close(m.embed(ids), ref["embed.mean"])
    assert close(m.embed(ids, pooling="last"), ref["embed.last"])
    raw = m.embed(ids, normalize=False)
    assert close(raw / np.linalg.norm(raw), ref["embed.mean"])


def test_lists_batch_and_equal_single_runs():
    ref, _ = sites("openai-f32")
    ids = ref["input_ids"].tolist()
    m = model("openai-f32")
    texts = [ids, ids[:3], ids[2:]]
    many = m.hidden_states(texts)
    assert isinstance(many, list) and len(many) == 3
    for t, h in zip(texts, many):
        assert np.array_equal(h, m.hidden_states(t))
    e = m.embed(texts)
    assert e.shape == (3, 64)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    caches = m.run_with_cache(texts, ["blocks.*.hook_resid_post"])
    assert len(caches) == 3 and set(caches[1][1]) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}


def test_bad_names_and_patches_are_clear_errors():
    ref, _ = sites("openai-f32")
    ids = ref["input_ids"].tolist()
    m = model("openai-f32")
    with pytest.raises(ValueError, match="no activation site"):
        m.run_with_cache(ids, ["blocks.0.hook_nothing"])
    with pytest.raises(ValueError, match="blocks 0 to 1"):
        m.run_with_cache(ids, "blocks.9.hook_resid_post")
    with pytest.raises(TypeError, match="names"):
        m.run_with_cache(ids, 5)
    with pytest.raises(ValueError, match="shape"):
        m.run_with_patches(ids, {"hook_embed": np.zeros((2, 64), np.float32)})
    with pytest.raises(TypeError, match="numpy array"):
        m.run_with_patches(ids, {"hook_embed": [[0.0] * 64] * len(ids)})
    with pytest.raises(ValueError, match="pooling"):
        m.embed(ids, pooling="max")
    with pytest.raises(ValueError, match="context"):
        m.hidden_states(list(range(33)))
