#!/usr/bin/env python3
"""Activation sites of a corpus with gpt2rs on Ray Data: text in, one row per token out.

A pool of actors each holds one model (``--replicas`` of them, ``--threads`` cores each); Ray Data
streams the corpus (JSON lines or Parquet with a text column) through them in batches. Each
document is cut into windows of ``--context`` tokens (default: the model's context), and every
token becomes a row: the document's id, the token's position in the document, the token id, and
one column per site (TransformerLens's names: ``blocks.5.hook_resid_post``,
``blocks.*.attn.hook_z``; patterns select several), written as Parquet files (Ray's tensor
columns). The pass stops after the last block a site is in.

    python python/examples/ray_activations.py --input corpus.jsonl --output acts/ --model gpt2 \\
        --sites 'blocks.5.hook_resid_post' --replicas 2 --threads 1 [--dtype-out f16]

    # on a cluster (RAY_ADDRESS set by `ray job submit`), as ray_score.py
    ray job submit --working-dir python/examples --runtime-env-json '{"pip": ["gpt2rs", "pyarrow"]}' -- \\
        python ray_activations.py --input s3://bucket/corpus/ --output s3://bucket/acts/ \\
        --model gpt2 --sites 'blocks.*.hook_resid_post' --replicas 16 --threads 4

For one machine, `gpt2 activations` writes the same values as sharded safetensors, resumably.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

# The corpus reader and local-Ray sizing are ray_score.py's, beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ray_score import IO, local_cpus, read  # noqa: E402


def windows(ids: Sequence[int], context: int):
    """(start, window) pieces of a document's ids, each at most `context` tokens."""
    return [(s, list(ids[s:s + context])) for s in range(0, len(ids), context)]


def activations(model, doc_ids: Sequence, texts: Sequence[str], sites: Sequence[str],
                context: int, dtype=np.float32) -> Dict[str, np.ndarray]:
    """One row per token of `texts`: id, position, token, and each site's values."""
    encoded = model.tokenizer.encode_batch([str(t) for t in texts])
    pieces = [(doc, s, w) for doc, ids in zip(doc_ids, encoded) for s, w in windows(ids, context)]
    out = {"id": [], "position": [], "token": []}
    values = {name: [] for name in sites}
    if pieces:
        for (doc, start, w), (_, cache) in zip(
                pieces, model.run_with_cache([w for _, _, w in pieces], list(sites), logits=False)):
            out["id"].extend([doc] * len(w))
            out["position"].extend(range(start, start + len(w)))
            out["token"].extend(w)
            for name in sites:
                values[name].append(cache[name].astype(dtype, copy=False))
    cols = {"id": np.array(out["id"], dtype=np.int64),
            "position": np.array(out["position"], dtype=np.int64),
            "token": np.array(out["token"], dtype=np.int64)}
    for name in sites:
        cols[name] = (np.concatenate(values[name]) if values[name]
                      else np.zeros((0,), dtype=dtype))
    return cols


class Activator:
    """A Ray Data actor: one model, activation rows for batches of documents."""

    def __init__(self, model: str, dtype: str, threads: int, text_column: str, id_column: str,
                 sites: List[str], context: Optional[int], dtype_out: str):
        import gpt2rs

        self.model = gpt2rs.Model.from_pretrained(model, dtype=dtype, threads=threads)
        # The site names the patterns select, checked once (a bad name fails here, not per batch).
        _, cache = self.model.run_with_cache([0], sites, logits=False)
        bad = [n for n in cache if n.endswith(("attn.hook_pattern", "attn.hook_attn_scores"))]
        if bad:
            raise ValueError(f"{bad[0]}: attention scores and patterns are (n_head, T, T), not a "
                             "row per token; use Model.attentions or run_with_cache")
        self.sites = list(cache)
        self.context = context or self.model.n_positions
        self.text_column, self.id_column = text_column, id_column
        self.dtype = {"f32": np.float32, "f16": np.float16}[dtype_out]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        texts = batch[self.text_column]
        ids = batch[self.id_column] if self.id_column in batch else np.arange(len(texts))
        return activations(self.model, ids.tolist(), list(texts), self.sites, self.context,
                           self.dtype)


def build(ray, args) -> "ray.data.Dataset":
    ds = read(ray, args.input, args.format)
    if args.limit:
        ds = ds.limit(args.limit)
    return ds.map_batches(
        Activator,
        fn_constructor_kwargs=dict(model=args.model, dtype=args.dtype, threads=args.threads,
                                   text_column=args.text_column, id_column=args.id_column,
                                   sites=args.sites, context=args.context,
                                   dtype_out=args.dtype_out),
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
    p.add_argument("--sites", required=True, type=lambda s: s.split(","),
                   help="site names or patterns, comma-separated")
    p.add_argument("--context", type=int, default=None, help="tokens per window")
    p.add_argument("--dtype-out", default="f32", choices=["f32", "f16"])
    p.add_argument("--replicas", type=int, default=2, help="actors, one model each")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    p.add_argument("--batch-size", type=int, default=16, help="documents per batch")
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id", help="the document id column (else its row number in the batch)")
    p.add_argument("--format", default="auto", choices=["auto", "json", "parquet"])
    p.add_argument("--limit", type=int, default=None, help="only the first N documents")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="local Ray only: CPUs Ray may use (default: all)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    import time

    import ray

    args = parse(argv)
    if not ray.is_initialized():
        ray.init(num_cpus=local_cpus(args.num_cpus))
    t0 = time.perf_counter()
    build(ray, args).write_parquet(args.output, ray_remote_args=IO)
    secs = time.perf_counter() - t0
    rows = ray.data.read_parquet(args.output).count()
    print(f"{rows} tokens in {secs:.1f} s: {rows / secs:.0f} tokens/s -> {args.output}")


if __name__ == "__main__":
    main()
