#!/usr/bin/env python3
"""The transformers side of the throughput comparison (run in a venv with torch + transformers,
outside the repository):

    python torch_score.py make /tmp/gpt2rs-bench           # random gpt2 and gpt2-medium, save_pretrained
    python torch_score.py score /tmp/gpt2rs-bench/gpt2 [--n 64] [--len 256] [--threads 2] [--batch 8]
    python torch_score.py hidden /tmp/gpt2rs-bench/gpt2 [--n 64] [--len 256] [--threads 2] [--batch 8]

`score` computes what gpt2rs' Model.score does: each token's log-prob given its prefix (log_softmax
over the vocabulary, gathered at the next token), for the same random documents (bench.py's docs),
with GPT2LMHeadModel in fp32 on the CPU. `hidden` computes what Model.hidden_states does: the
residual stream after every layer (`output_hidden_states=True`) into numpy, with GPT2Model (no LM
head) in fp32.
"""

import argparse
import time

from bench import docs


def make(out):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    for name, (layers, width, heads) in {"gpt2": (12, 768, 12),
                                         "gpt2-medium": (24, 1024, 16)}.items():
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=50257,
                         n_positions=1024)
        GPT2LMHeadModel(cfg).save_pretrained(f"{out}/{name}", safe_serialization=True)
        print(f"{out}/{name}")


def score(a):
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(a.threads)
    m = GPT2LMHeadModel.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    ids = torch.tensor(docs(a.n, a.len, m.config.vocab_size))
    for _ in range(a.repeat):
        t = time.perf_counter()
        total = 0.0
        with torch.inference_mode():
            for b in range(0, a.n, a.batch):
                x = ids[b:b + a.batch]
                logits = m(x).logits[:, :-1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])
                total += float(lp.double().sum())
        s = time.perf_counter() - t
        print(f"torch GPT2LMHeadModel: {a.n} docs x {a.len} tokens, batch {a.batch}, "
              f"{a.threads} threads in {s:.3f} s = {a.n * a.len / s:.1f} tokens/s (sum {total:.3f})")


def hidden(a):
    import torch
    from transformers import GPT2Model

    torch.set_num_threads(a.threads)
    m = GPT2Model.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    ids = torch.tensor(docs(a.n, a.len, m.config.vocab_size))
    for _ in range(a.repeat):
        t = time.perf_counter()
        total = 0.0
        with torch.inference_mode():
            for b in range(0, a.n, a.batch):
                hs = m(ids[b:b + a.batch], output_hidden_states=True).hidden_states
                arr = torch.stack(hs, dim=1).numpy()  # (batch, n_layer + 1, T, n_embd)
                total += float(arr[:, -1, -1, 0].sum())
        s = time.perf_counter() - t
        print(f"torch GPT2Model hidden states: {a.n} docs x {a.len} tokens, batch {a.batch}, "
              f"{a.threads} threads in {s:.3f} s = {a.n * a.len / s:.1f} tokens/s (check {total:.3f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["make", "score", "hidden"])
    p.add_argument("model")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    {"make": lambda a: make(a.model), "score": score, "hidden": hidden}[a.what](a)
