#!/usr/bin/env python3
"""Build the reference fixtures: small random-weight GPT-2 checkpoints and what transformers outputs.

Run in a venv outside the repo (CI never runs this; its outputs are committed):

    python3 -m venv ../venv && ../venv/bin/pip install -r scripts/requirements.txt
    ../venv/bin/python scripts/make_fixtures.py

Writes tests/fixtures/models/<name>/{config.json, weights, reference.safetensors} and
tests/fixtures/tokenizer/golden.json. Every number the Rust tests compare against comes from
transformers' GPT2LMHeadModel / GPT2TokenizerFast here.
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
MODELS = os.path.join(OUT, "models")


def randomise(model, seed):
    """Non-trivial values everywhere: transformers' zero biases and unit LayerNorms would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("wte.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
            else:
                fan_in = p.shape[0] if p.dim() == 2 else 16
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5 if p.dim() == 2 else 0.2))


def inputs_for(config, seed):
    """Two sequences: the full context, and a short one."""
    g = torch.Generator().manual_seed(seed + 1000)
    long = torch.randint(0, config.vocab_size, (config.n_positions,), generator=g)
    short = torch.randint(0, config.vocab_size, (7,), generator=g)
    return [long, short]


def record(name, directory, config, seed):
    """Reload the checkpoint the way a user would (in float32) and record its logits per sequence."""
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tensors = {}
    with torch.no_grad():
        for i, ids in enumerate(inputs_for(config, seed)):
            logits = model(ids[None, :]).logits[0]
            tensors[f"input_ids.{i}"] = ids.to(torch.int64).contiguous()
            tensors[f"logits.{i}"] = logits.to(torch.float32).contiguous()
    save_file(tensors, os.path.join(directory, "reference.safetensors"))
    print(f"{name}: recorded {len(tensors) // 2} sequences")


def make(name, seed, layout, dtype=torch.float32, shard=None, **cfg):
    directory = os.path.join(MODELS, name)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    # End-of-text inside the reduced vocabulary, so generation fixtures can stop on it.
    cfg.setdefault("bos_token_id", cfg["vocab_size"] - 1)
    cfg.setdefault("eos_token_id", cfg["vocab_size"] - 1)
    config = GPT2Config(**cfg)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    randomise(model, seed)
    if layout == "openai":
        # The hub's openai-community/gpt2 layout: no `transformer.` prefix, causal-mask buffers
        # stored as `h.N.attn.bias` (and `masked_bias` in older files), no lm_head.
        n = config.n_positions
        sd = {}
        for k, v in model.transformer.state_dict().items():
            sd[k] = v.to(dtype).contiguous()
        for i in range(config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n).to(dtype)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=dtype)
        save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(directory)
    else:
        model.to(dtype).save_pretrained(directory, max_shard_size=shard or "10GB")
    # Keep only what a checkpoint needs.
    for f in os.listdir(directory):
        if f == "generation_config.json":
            os.remove(os.path.join(directory, f))
    record(name, directory, config, seed)


def make_models():
    small = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=384)
    make("openai-f32", 1, "openai", **small)
    make("hf-f16", 2, "hf", dtype=torch.float16, **{**small, "n_head": 2})
    make("hf-bf16", 3, "hf", dtype=torch.bfloat16, **small)
    make("headdim-24", 4, "hf", n_layer=2, n_embd=96, n_head=4, n_positions=24, vocab_size=300, n_inner=200)
    make("sharded", 5, "hf", shard="100KB", activation_function="gelu", **small)
    make(
        "scale-inv-layer", 6, "hf", n_layer=3, n_embd=48, n_head=3, n_positions=20, vocab_size=256,
        scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
    )


TOKENIZER_CASES = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "Hello\n\nworld\n",
    "line one\r\nline two\r\n",
    "tabs\tand\t\tmore\t",
    "I'm, you're, he's, we've, they'll, I'd, can't",
    "I'M YOU'RE HE'S WE'VE THEY'LL I'D CAN'T",
    "'s 't 're 've 'm 'll 'd 'S 'T",
    "Numbers: 0 1 12 123 1234 12345 3.14159 1,000,000",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> again",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café résumé Zürich",
    "e\u0301 a\u0308 combining marks",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "Привет, мир!",
    "مرحبا بالعالم",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "\u00a0non-breaking\u00a0spaces\u2003em-space",
    "    ",
    "a\n \n b",
    "x  \n\n  y",
    "!!!???...,,,;;;",
    "ℕ ½ Ⅳ ² ٣ digits of other scripts",
    "https://example.com/path?query=1&b=2",
    "\u200bzero\u200bwidth",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


def make_tokenizer_golden():
    assets = os.path.join(ROOT, "assets", "gpt2")
    tok = GPT2TokenizerFast(
        vocab=os.path.join(assets, "encoder.json"),
        merges=os.path.join(assets, "vocab.bpe"),
    )
    # transformers 5 silently ignores vocab_file/merges_file; check that these files were used.
    assert tok("Hello world")["input_ids"] == [15496, 995], "tokenizer files were not used"
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok(text)["input_ids"]
        cases.append({"text": text, "ids": ids, "tokens": [tok.decode([i]) for i in ids]})
    os.makedirs(os.path.join(OUT, "tokenizer"), exist_ok=True)
    with open(os.path.join(OUT, "tokenizer", "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "transformers.GPT2TokenizerFast", "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"tokenizer: {len(cases)} golden cases")


if __name__ == "__main__":
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    make_models()
    make_tokenizer_golden()
