#!/usr/bin/env python3
"""Score a corpus with gpt2rs on Ray Data: each document's token count, total NLL and perplexity.

A pool of actors each holds one model (``--replicas`` of them, ``--threads`` cores each); Ray Data
streams the corpus (JSON lines or Parquet with a text column) through them in batches and writes
Parquet. The same script runs on a laptop and on a cluster:

    # laptop: ray.init() starts a local Ray
    python python/examples/ray_score.py --input corpus.jsonl --output scores/ --model gpt2 \\
        --replicas 2 --threads 1

    # cluster: the driver joins the running cluster (RAY_ADDRESS is set by `ray job submit`)
    ray job submit --working-dir python/examples --runtime-env-json '{"pip": ["gpt2rs", "pyarrow"]}' -- \\
        python ray_score.py --input s3://bucket/corpus/ --output s3://bucket/scores/ \\
        --model gpt2-medium --dtype q8 --replicas 16 --threads 4

Sizing: replicas × threads should equal the cores Ray may use (per node, threads ≤ its cores).
Few threads per replica is the most efficient (the engine's per-token parallel loops have less to
share); more threads per replica lower the latency of each batch and the memory (one model copy
per replica: gpt2 f32 is ~0.5 GB, q8 a quarter of that).

Texts that fit the model's context are scored several per forward pass (``Model.score``); longer
ones get strided perplexity (``Model.perplexity``, windows of the context advanced by
``--stride``). ``scored`` is the number of tokens with a log-prob (all but the first, and with
stride = context the first of each window); perplexity = exp(nll / scored), NaN when nothing was
scored (texts of fewer than 2 tokens).
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import numpy as np


def score_texts(model, texts: Sequence[str], stride: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Token count, scored tokens, total NLL (nats) and perplexity of each text."""
    ids = model.tokenizer.encode_batch([str(t) for t in texts])
    n = len(ids)
    tokens = np.array([len(x) for x in ids], dtype=np.int64)
    scored = np.zeros(n, dtype=np.int64)
    nll = np.zeros(n, dtype=np.float64)
    fit = [i for i, x in enumerate(ids) if 2 <= len(x) <= model.n_positions]
    if fit:
        for i, lp in zip(fit, model.score([ids[i] for i in fit])):
            nll[i] = -float(np.sum(lp, dtype=np.float64))
            scored[i] = len(lp)
    for i, x in enumerate(ids):
        if len(x) > model.n_positions:
            p = model.perplexity(x, stride=stride)
            nll[i], scored[i] = p.nll, p.scored
    # math.exp, not np.exp: the two may differ in the last bit, and this is the reference formula.
    ppl = np.array([math.exp(l / s) if s else math.nan for l, s in zip(nll.tolist(), scored.tolist())])
    return {"tokens": tokens, "scored": scored, "nll": nll, "perplexity": ppl}


class Scorer:
    """A Ray Data actor: one model, scoring batches of documents."""

    def __init__(self, model: str, dtype: str, threads: int, text_column: str,
                 stride: Optional[int], keep_text: bool):
        import gpt2rs

        self.model = gpt2rs.Model.from_pretrained(model, dtype=dtype, threads=threads)
        self.text_column, self.stride, self.keep_text = text_column, stride, keep_text

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        texts = batch[self.text_column]
        out = {k: v for k, v in batch.items() if self.keep_text or k != self.text_column}
        out.update(score_texts(self.model, list(texts), self.stride))
        return out


# Reading and writing reserve no CPU: replicas × threads may then take every core Ray has (the
# model's work dominates), and the actors can never starve the readers that feed them.
IO = {"num_cpus": 0}


def read(ray, path: str, fmt: str):
    if fmt == "auto":
        fmt = "parquet" if path.rstrip("/").endswith(".parquet") else "json"
        if fmt == "json" and not any(path.endswith(e) for e in (".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            # A directory: look at what it holds.
            import os

            if os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path)):
                fmt = "parquet"
    reader = ray.data.read_parquet if fmt == "parquet" else ray.data.read_json
    return reader(path, num_cpus=0)


def build(ray, args) -> "ray.data.Dataset":
    ds = read(ray, args.input, args.format)
    if args.limit:
        ds = ds.limit(args.limit)
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs=dict(model=args.model, dtype=args.dtype, threads=args.threads,
                                   text_column=args.text_column, stride=args.stride,
                                   keep_text=args.keep_text),
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.replicas),
        num_cpus=args.threads,
    )


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSON lines or Parquet file(s) or directory")
    p.add_argument("--output", required=True, help="directory for the Parquet output")
    p.add_argument("--model", default="gpt2", help="hub id or checkpoint directory")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8"])
    p.add_argument("--replicas", type=int, default=2, help="actors, one model each")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    p.add_argument("--batch-size", type=int, default=64, help="documents per batch")
    p.add_argument("--text-column", default="text")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity stride for texts longer than the context (default: the context)")
    p.add_argument("--format", default="auto", choices=["auto", "json", "parquet"])
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents")
    p.add_argument("--keep-text", action="store_true", help="copy the text column to the output")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="local Ray only: CPUs Ray may use (default: all)")
    return p.parse_args(argv)


def local_cpus(asked: Optional[int]) -> Optional[int]:
    """CPUs for a local Ray: the cores plus one for Ray Data's own tasks (Parquet file listing
    takes a whole CPU in Ray 2.60), so that replicas × threads = cores never starves them. Under
    `ray job submit` (RAY_ADDRESS set) the cluster's resources apply and this is not used."""
    import os

    if asked or os.environ.get("RAY_ADDRESS"):
        return asked
    return (os.cpu_count() or 1) + 1


def main(argv: Optional[List[str]] = None) -> None:
    import time

    import ray

    args = parse(argv)
    # Joins a cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts a local Ray.
    if not ray.is_initialized():
        ray.init(num_cpus=local_cpus(args.num_cpus))
    t0 = time.perf_counter()
    build(ray, args).write_parquet(args.output, ray_remote_args=IO)
    secs = time.perf_counter() - t0
    out = ray.data.read_parquet(args.output)
    docs = out.count()
    tokens = out.sum("tokens") if docs else 0
    print(f"{docs} documents, {tokens} tokens in {secs:.1f} s: {docs / secs:.1f} docs/s, "
          f"{tokens / secs:.0f} tokens/s -> {args.output}")


if __name__ == "__main__":
    main()
