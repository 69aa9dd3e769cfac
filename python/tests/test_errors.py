"""Every engine error reaches Python as an exception carrying the engine's message."""

import http.server
import shutil
import subprocess
import sys
import textwrap
import threading

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


def test_an_uncached_hub_id_offline_is_file_not_found(tmp_path, monkeypatch):
    # As huggingface_hub's LocalEntryNotFoundError (a FileNotFoundError): not a bad argument.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as e:
        gpt2rs.Model.from_pretrained("gpt2")
    assert not isinstance(e.value, ValueError)


def test_an_unreachable_hub_is_connection_error(tmp_path, monkeypatch):
    # Nothing listens on port 1: the connection is refused at once. The no-network hint comes along.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    with pytest.raises(ConnectionError, match="no network?"):
        gpt2rs.Model.from_pretrained("gpt2")


def test_a_hub_that_answers_with_an_error_is_os_error(tmp_path, monkeypatch):
    # A Hub that is there but has no such repository: an OSError, not a network failure.
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(OSError, match="downloading") as e:
            gpt2rs.Model.from_pretrained("owner/no-such-model")
        assert not isinstance(e.value, (ConnectionError, ValueError))
    finally:
        server.shutdown()


def test_a_bad_hub_timeout_setting_is_value_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HF_HUB_ETAG_TIMEOUT"):
        gpt2rs.Model.from_pretrained("gpt2")


@pytest.mark.parametrize("kw,exc,msg", [
    ({"dtype": "f64"}, ValueError, "dtype"),
    ({"device": "tpu"}, ValueError, "expected cpu, cuda, cuda:N, gpu, gpu:N"),
    ({"device": "cuda"}, RuntimeError, "no CUDA support"),
    ({"device": "gpu"}, RuntimeError, "no wgpu support"),
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
    (lambda m: m.score([[1, 2, 3], [5]], diagnostics=True), ValueError, "text 1: scoring needs"),
    (lambda m: m.score([1, 384], diagnostics=True), ValueError, "token 1 has id 384"),
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
    # An id-valued argument must be in the vocabulary (384 ids), as the CLI checks.
    (lambda m: m.generate([1], max_tokens=5, eos_token_id=10**6), ValueError,
     "eos_token_id 1000000 is not a token id: the vocabulary has 384 entries"),
    (lambda m: m.generate([1], max_tokens=5, eos_token_id=384), ValueError, "eos_token_id 384"),
    (lambda m: m.generate([1], max_tokens=5, eos_token_id=2**64), OverflowError, None),
    (lambda m: m.stream([1], max_tokens=5, eos_token_id=10**6), ValueError,
     "eos_token_id 1000000 is not a token id"),
    (lambda m: m.stream([1], max_tokens=5, eos_token_id=-5), ValueError, "eos_token_id -5"),
    # bytes are encoded text, not token ids: refused wherever a text or ids are taken.
    (lambda m: m.generate(b"hello"), TypeError, "got bytes; decode bytes to a str first"),
    (lambda m: m.generate(bytearray(b"hello")), TypeError, "got bytearray"),
    (lambda m: m.generate([b"hello", b"world"]), TypeError, "prompt 0: .*got bytes"),
    (lambda m: m.generate(["hello", b"world"]), TypeError, "prompt 1: .*got bytes"),
    (lambda m: m.stream(b"hello"), TypeError, "got bytes"),
    (lambda m: m.logits(b"hello"), TypeError, "got bytes"),
    (lambda m: m.top(b"hello"), TypeError, "got bytes"),
    (lambda m: m.score(b"hello"), TypeError, "got bytes"),
    (lambda m: m.score([b"hello", b"world"]), TypeError, "text 0: .*got bytes"),
    (lambda m: m.score(["hello", bytearray(b"world")]), TypeError, "text 1: .*got bytearray"),
    (lambda m: m.perplexity(b"hello world"), TypeError, "got bytes"),
    (lambda m: m.tokenizer.encode(b"hello"), TypeError, "bytes"),
    (lambda m: m.tokenizer.encode_batch([b"hello"]), TypeError, None),
    (lambda m: m.tokenizer.encode_batch(b"hello"), TypeError, None),
    (lambda m: m.tokenizer.decode(b"hello"), TypeError, "got bytes"),
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


def test_an_impossible_beam_search_is_memory_error_and_the_interpreter_lives():
    # 10**6 beams over GPT-2's 50257-token vocabulary would need about a terabyte: the engine
    # refuses before allocating. Run apart, so that an allocator abort cannot take pytest down.
    code = textwrap.dedent(f"""
        import gpt2rs
        m = gpt2rs.Model.from_pretrained({str(MODELS / "full-vocab-f16")!r})
        try:
            m.generate("Hi", num_beams=10**6, max_tokens=2)
        except MemoryError as e:
            print("MemoryError:", e)
        # The model still serves.
        m.generate("Hi", num_beams=2, max_tokens=2)
        print("alive")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "MemoryError:" in r.stdout and "beams" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("alive"), r.stdout
