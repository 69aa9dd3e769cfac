"""Every engine error reaches Python as an exception carrying the engine's message."""

import shutil

import pytest

import gpt2rs
from conftest import MODELS, model

FIX = MODELS / "openai-f32"  # context 32, vocabulary 384


def load(path, **kw):
    return gpt2rs.Model.from_pretrained(str(path), **kw)


def test_a_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load(tmp_path / "nope")


def test_a_directory_without_config_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_a_directory_without_weights_is_a_checkpoint_error(tmp_path):
    # The engine reports it as a checkpoint (Weights) error, not an I/O one: RuntimeError.
    shutil.copy(FIX / "config.json", tmp_path / "config.json")
    with pytest.raises(RuntimeError, match="no model.safetensors"):
        load(tmp_path)


def test_a_bad_config_is_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config"):
        load(tmp_path)


def test_truncated_weights_are_runtime_error(tmp_path):
    shutil.copy(FIX / "config.json", tmp_path / "config.json")
    data = (FIX / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="checkpoint"):
        load(tmp_path)


def test_an_uncached_hub_id_offline_is_value_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        gpt2rs.Model.from_pretrained("gpt2")


@pytest.mark.parametrize("kw,exc,msg", [
    ({"dtype": "f64"}, ValueError, "dtype"),
    ({"device": "tpu"}, ValueError, "expected cpu, cuda or cuda:N"),
    ({"device": "cuda"}, RuntimeError, "no CUDA support"),
    ({"threads": 0}, ValueError, "threads 0"),
    ({"threads": 10**6}, ValueError, "threads 1000000"),
])
def test_bad_load_options(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        load(FIX, **kw)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda m: m.logits([]), ValueError, "expected 1 to the context of 32"),
    (lambda m: m.logits(list(range(33))), ValueError, "context of 32"),
    (lambda m: m.logits([1, 384]), ValueError, "token 1 has id 384"),
    (lambda m: m.logits([1, -2]), ValueError, "id -2"),
    (lambda m: m.logits(3.5), TypeError, "expected a str or a list of token ids"),
    (lambda m: m.top([], 5), ValueError, "no tokens"),
    (lambda m: m.top([1, 2], -1), ValueError, "k -1"),
    (lambda m: m.score([5]), ValueError, "at least 2 tokens"),
    (lambda m: m.score([[1, 2, 3], [5]]), ValueError, "text 1: scoring needs at least 2"),
    (lambda m: m.score(list(range(33))), ValueError, "more than the context of 32"),
    (lambda m: m.score([[1, 2], {"a": 1}]), TypeError, "text 1"),
    (lambda m: m.perplexity(list(range(100)), stride=0), ValueError, "stride 0"),
    (lambda m: m.perplexity(list(range(100)), context=33), ValueError, "context 33"),
    (lambda m: m.perplexity([1]), ValueError, "at least 2 tokens"),
    (lambda m: m.perplexity(list(range(100)), batch=0), ValueError, "batch 0"),
    (lambda m: m.generate([1], max_tokens=0), ValueError, "max_tokens 0"),
    (lambda m: m.generate([1], temperature=-1.0), ValueError, "temperature"),
    (lambda m: m.generate([1], top_p=0.0), ValueError, "top-p"),
    (lambda m: m.generate([1], top_k=-3), ValueError, "top_k -3"),
    (lambda m: m.generate([1], repetition_penalty=0.0), ValueError, "repetition penalty"),
    (lambda m: m.generate([1], stop=""), ValueError, "stop string must not be empty"),
    (lambda m: m.generate([1], stop=3), TypeError, "stop"),
    (lambda m: m.generate([1], num_beams=2, temperature=0.7), ValueError, "beam search is deterministic"),
    (lambda m: m.generate([1], num_beams=2, num_return_sequences=3), ValueError, "num return sequences"),
    (lambda m: m.generate([1], num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping"),
    (lambda m: m.generate(list(range(30)), max_tokens=5), ValueError, "exceed the context of 32"),
    (lambda m: m.generate([], max_tokens=5), ValueError, "no prompts"),
    (lambda m: m.generate([[1], [400]], max_tokens=5), ValueError, "prompt 1"),
    (lambda m: m.generate([1], max_tokens=5, eos_token_id=-1), ValueError, "eos_token_id"),
    (lambda m: m.stream([1], max_tokens=40), ValueError, "leaves no room"),
    (lambda m: m.tokenizer.decode([10**6]), ValueError, "not in the vocabulary"),
    (lambda m: m.tokenizer.decode([-1]), ValueError, "not a token id"),
    (lambda m: m.tokenizer.encode_batch("one string"), TypeError, "str"),
])
def test_bad_calls_raise(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(model("openai-f32"))


def test_truncate_prompt_is_accepted():
    m = model("openai-f32")
    out = m.generate(list(range(30)), max_tokens=5, temperature=0, truncate_prompt=True)
    assert out.prompt_ids == list(range(3, 30)) and len(out.tokens) <= 5


def test_a_failed_call_leaves_the_model_usable():
    m = model("openai-f32")
    with pytest.raises(ValueError):
        m.logits([1, 999])
    assert m.logits([1, 2]).shape == (2, 384)
