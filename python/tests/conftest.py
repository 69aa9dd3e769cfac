"""Shared helpers: the repository's fixture checkpoints and transformers' recorded outputs."""

import functools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import gpt2rs

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "tests" / "fixtures" / "models"
FIXTURES = [
    "openai-f32",
    "hf-f16",
    "hf-bf16",
    "headdim-24",
    "sharded",
    "scale-inv-layer",
    "full-vocab-f16",
]
# The CLI of this checkout (.ci/python-tests builds it); GPT2_BIN overrides.
GPT2_BIN = Path(os.environ.get("GPT2_BIN", REPO / "target" / "release" / "gpt2"))


@functools.lru_cache(maxsize=None)
def model(name: str, dtype: str = "f32", threads=None) -> gpt2rs.Model:
    return gpt2rs.Model.from_pretrained(str(MODELS / name), dtype=dtype, threads=threads)


@functools.lru_cache(maxsize=None)
def reference(name: str) -> dict:
    return load_file(str(MODELS / name / "reference.safetensors"))


def generate_cases() -> list:
    path = REPO / "tests" / "fixtures" / "generation" / "generate.json"
    return json.loads(path.read_text())["cases"]


def cli_json(*args: str) -> dict:
    """Run the gpt2 CLI with --json and return its object."""
    if not GPT2_BIN.is_file():
        pytest.fail(f"{GPT2_BIN} is missing: run `cargo build --release --locked` first")
    out = subprocess.run(
        [str(GPT2_BIN), *args, "--json"], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0
