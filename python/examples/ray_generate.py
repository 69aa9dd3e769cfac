#!/usr/bin/env python3
"""Batch generation with gpt2rs on Ray Data: prompts in (JSON lines or Parquet with a prompt
column), one continuation per prompt out (Parquet: text, token count, finish reason).

    python python/examples/ray_generate.py --input prompts.jsonl --output gen/ --model gpt2 \\
        --max-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1 --replicas 2 --threads 1
    ray job submit --working-dir python/examples --runtime-env-json '{"pip": ["gpt2rs", "pyarrow"]}' -- \\
        python ray_generate.py --input s3://bucket/prompts/ --output s3://bucket/gen/ --replicas 16

Each actor holds one model and generates a whole batch of prompts together (one forward pass per
step for the batch); each result equals generating that prompt alone with the same seed.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import numpy as np


class Generator:
    def __init__(self, model: str, dtype: str, threads: int, prompt_column: str, settings: dict):
        import gpt2rs

        self.model = gpt2rs.Model.from_pretrained(model, dtype=dtype, threads=threads)
        self.prompt_column, self.settings = prompt_column, settings

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        prompts = [str(p) for p in batch[self.prompt_column]]
        results = self.model.generate(prompts, **self.settings)
        out = dict(batch)
        out["generated"] = np.array([r.text for r in results], dtype=object)
        out["generated_tokens"] = np.array([len(r.tokens) for r in results], dtype=np.int64)
        out["finish_reason"] = np.array([r.finish_reason for r in results], dtype=object)
        return out


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

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16", "q8"])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args(argv)
    settings = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=args.stop, truncate_prompt=True)

    if not ray.is_initialized():
        ray.init(num_cpus=local_cpus(args.num_cpus))
    reader = ray.data.read_parquet if args.input.rstrip("/").endswith(".parquet") else ray.data.read_json
    t0 = time.perf_counter()
    # I/O reserves no CPU, so that the replicas may take every core (see ray_score.py).
    io = {"num_cpus": 0}
    reader(args.input, num_cpus=0).map_batches(
        Generator,
        fn_constructor_kwargs=dict(model=args.model, dtype=args.dtype, threads=args.threads,
                                   prompt_column=args.prompt_column, settings=settings),
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=args.replicas),
        num_cpus=args.threads,
    ).write_parquet(args.output, ray_remote_args=io)
    out = ray.data.read_parquet(args.output)
    secs = time.perf_counter() - t0
    n, toks = out.count(), out.sum("generated_tokens")
    print(f"{n} prompts, {toks} tokens generated in {secs:.1f} s ({toks / secs:.1f} tokens/s) -> {args.output}")


if __name__ == "__main__":
    main()
