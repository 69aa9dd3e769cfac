"""Ctrl-C stops a long call: the engine looks for Python signals between steps while it works
without the GIL, so KeyboardInterrupt does not wait for the call to end."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import MODELS

# Each call runs for minutes uninterrupted (tens of seconds on a fast machine) in steps well
# under a second.
CALLS = {
    # 500 sequences of 63 tokens over GPT-2's 50257-token vocabulary (context 64).
    "generate": ("full-vocab-f16",
                 "m.generate(['Hello'] * 500, max_tokens=63, ignore_eos=True, seed=1)"),
    # 1.5 million windows of 32 tokens (stride 1).
    "perplexity": ("openai-f32", "m.perplexity(list(range(384)) * 4000, stride=1)"),
    # 400000 texts of 32 tokens.
    "score": ("openai-f32", "m.score([list(range(32))] * 400_000)"),
}

# From SIGINT to the end of the process: a step, the signal check's period, and the exit.
PROMPT = 5.0


@pytest.mark.parametrize("name", sorted(CALLS))
def test_ctrl_c_interrupts_a_long_call(name):
    fixture, call = CALLS[name]
    code = textwrap.dedent(f"""
        import signal
        import gpt2rs
        # Python installs its Ctrl-C handler only where SIGINT was not ignored at start (a
        # background job's); this test needs it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        m = gpt2rs.Model.from_pretrained({str(MODELS / fixture)!r})
        print("ready", flush=True)
        try:
            {call}
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            # The model still serves after an interrupted call.
            assert m.logits([1, 2]).shape[0] == 2
            print("usable", flush=True)
        else:
            print("finished", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: still running 30 s after SIGINT")
        took = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, f"exit {p.returncode}: {err[-2000:]}"
    assert "KeyboardInterrupt" in out and "usable" in out, out
    assert took < PROMPT, f"{name}: KeyboardInterrupt came {took:.1f} s after SIGINT"
