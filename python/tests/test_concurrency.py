"""One model used from several Python threads (the GIL released while the engine computes), and
models of different dtypes and thread counts side by side."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import gpt2rs
from conftest import MODELS

TEXTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "Its base is square, measuring 125 metres on each side.",
    "During its construction, the Eiffel Tower surpassed the Washington Monument.",
    "Hello world",
] * 4


def work(m):
    """A mix of every kind of call; returns everything it computed."""
    return (
        [s.tolist() for s in m.score(TEXTS)],
        m.logits(m.tokenizer.encode(TEXTS[0])).tobytes(),
        m.generate(TEXTS[1], max_tokens=20, temperature=0.8, seed=9).tokens,
        m.generate(TEXTS[2], max_tokens=8, num_beams=3).tokens,
        "".join(m.stream(TEXTS[3], max_tokens=20, seed=4)),
        m.perplexity(" ".join(TEXTS), stride=32).nll,
        m.top(TEXTS[0], 5),
    )


def test_four_threads_on_one_model_get_the_serial_results():
    m = gpt2rs.Model.from_pretrained(str(MODELS / "full-vocab-f16"), threads=2)
    serial = work(m)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: work(m), range(8)))
    for r in results:
        assert r == serial


def test_two_models_of_different_dtypes_and_threads_coexist():
    f32 = gpt2rs.Model.from_pretrained(str(MODELS / "full-vocab-f16"), threads=1)
    q8 = gpt2rs.Model.from_pretrained(str(MODELS / "full-vocab-f16"), dtype="q8", threads=2)
    assert (f32.threads, q8.threads, f32.dtype, q8.dtype) == (1, 2, "f32", "q8")
    alone = (work(f32), work(q8))
    assert alone[0] != alone[1]  # q8 rounds the weights: the outputs differ
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(work, m) for m in (f32, q8, f32, q8)]
        got = [f.result() for f in futs]
    assert got == [alone[0], alone[1], alone[0], alone[1]]


def test_the_gil_is_released_while_the_engine_computes():
    m = gpt2rs.Model.from_pretrained(str(MODELS / "full-vocab-f16"), threads=1)
    long = m.tokenizer.encode(" ".join(TEXTS * 40))  # ~ 4000 tokens: a second or so of work
    t0 = time.perf_counter()
    m.perplexity(long, stride=32)
    alone = time.perf_counter() - t0

    worker = threading.Thread(target=m.perplexity, args=(long,), kwargs={"stride": 32})
    worst_gap, ticks = 0.0, 0
    worker.start()
    last = time.perf_counter()
    while worker.is_alive():
        now = time.perf_counter()
        worst_gap, last, ticks = max(worst_gap, now - last), now, ticks + 1
        time.sleep(0.001)
    worker.join()
    # Holding the GIL would stall this loop for the whole call; released, it keeps ticking.
    assert ticks > 20, ticks
    assert worst_gap < alone / 2, (worst_gap, alone)


def test_scores_are_float32_arrays_that_own_their_memory():
    m = gpt2rs.Model.from_pretrained(str(MODELS / "full-vocab-f16"))
    a = m.score(TEXTS[:2])
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in a)
    a[0][0] = 1.0  # writable, and not shared with a later call
    assert m.score(TEXTS[:2])[0][0] != 1.0
