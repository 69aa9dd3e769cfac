#!/usr/bin/env python3
"""Ray pipeline (python/examples/ray_score.py) vs a plain loop over the same corpus and total threads.

    python python/bench/ray_vs_loop.py make CORPUS.jsonl [--docs 256] [--words 80]
    python python/bench/ray_vs_loop.py loop CORPUS.jsonl MODEL [--threads 2] [--dtype q8]
    python python/examples/ray_score.py --input CORPUS.jsonl --output OUT --model MODEL --replicas 2 --threads 1 --dtype q8
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main():
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["make", "loop"])
    p.add_argument("corpus")
    p.add_argument("model", nargs="?")
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--words", type=int, default=80)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="q8")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    if a.what == "make":
        import random

        rng = random.Random(0)
        words = ("the tower is tall and its base is square while Paris has many visitors during "
                 "summer 1889 engineers built iron lattice river city night light").split()
        with open(a.corpus, "w") as f:
            for i in range(a.docs):
                n = rng.randint(a.words // 2, a.words * 3 // 2)
                f.write(json.dumps({"id": i, "text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
        return
    import gpt2rs
    from ray_score import score_texts

    texts = [json.loads(l)["text"] for l in open(a.corpus)]
    t = time.perf_counter()
    m = gpt2rs.Model.from_pretrained(a.model, dtype=a.dtype, threads=a.threads)
    tokens = 0
    for b in range(0, len(texts), a.batch_size):
        tokens += int(score_texts(m, texts[b:b + a.batch_size])["tokens"].sum())
    s = time.perf_counter() - t
    print(f"plain loop ({a.threads} threads, load included): {len(texts)} documents, {tokens} tokens "
          f"in {s:.1f} s: {len(texts) / s:.1f} docs/s")


if __name__ == "__main__":
    main()
