#!/usr/bin/env python3
"""gpt2rs speed figures (docs/BENCHMARKS.md style): Model.score on N documents of L tokens, and
Model.generate's per-token decode cost. The documents are the same random ids as
examples/bench_score.rs (`cargo run --release --example bench_score`), so the Rust library's time
for the same work compares directly.

    python python/bench/bench.py score MODEL_DIR [--n 64] [--len 256] [--dtype f32] [--threads 2] [--repeat 3]
    python python/bench/bench.py hidden MODEL_DIR [--n 64] [--len 256] [--dtype f32] [--threads 2] [--repeat 3]
    python python/bench/bench.py generate MODEL_DIR [--prompt 128] [--tokens 129] [--dtype f32] [--threads 2]
"""

import argparse
import time


def docs(n, length, vocab):
    """bench_score.rs's generator: a 64-bit LCG, ids from its high bits."""
    x, out, mask = 0x9E3779B97F4A7C15, [], (1 << 64) - 1
    for _ in range(n):
        d = []
        for _ in range(length):
            x = (x * 6364136223846793005 + 1442695040888963407) & mask
            d.append((x >> 33) % vocab)
        out.append(d)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["score", "hidden", "generate"])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=129, help="generated: 1 from the prefill + decoded")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--dtype", default="f32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    import gpt2rs

    m = gpt2rs.Model.from_pretrained(a.model, dtype=a.dtype, threads=a.threads)
    if a.what == "score":
        ds = docs(a.n, a.len, m.vocab_size)
        for _ in range(a.repeat):
            t = time.perf_counter()
            scores = m.score(ds)
            s = time.perf_counter() - t
            total = sum(float(x.astype("float64").sum()) for x in scores)
            print(f"python Model.score: {a.n} docs x {a.len} tokens in {s:.3f} s = "
                  f"{a.n * a.len / s:.1f} tokens/s (sum {total:.3f})")
    elif a.what == "hidden":
        # Model.hidden_states over the documents, each (n_layer + 1, len, n_embd) float32.
        ds = docs(a.n, a.len, m.vocab_size)
        for _ in range(a.repeat):
            t = time.perf_counter()
            hs = m.hidden_states(ds)
            s = time.perf_counter() - t
            check = sum(float(h[-1, -1, 0]) for h in hs)
            print(f"python Model.hidden_states: {a.n} docs x {a.len} tokens in {s:.3f} s = "
                  f"{a.n * a.len / s:.1f} tokens/s (check {check:.3f})")
    else:
        prompt = docs(1, a.prompt, m.vocab_size)[0]  # as `gpt2 bench --prompt 128 --decode 128`
        for _ in range(a.repeat):
            # Per-token cost without the prefill: (time for N tokens - time for 1) / (N - 1).
            t = time.perf_counter()
            m.generate(prompt, max_tokens=1, temperature=0)
            one = time.perf_counter() - t
            t = time.perf_counter()
            out = m.generate(prompt, max_tokens=a.tokens, temperature=0, ignore_eos=True)
            full = time.perf_counter() - t
            assert len(out.tokens) == a.tokens
            per = (full - one) / (a.tokens - 1)
            print(f"python Model.generate: {1 / per:.1f} tokens/s decode ({per * 1e3:.2f} ms/token)")


if __name__ == "__main__":
    main()
