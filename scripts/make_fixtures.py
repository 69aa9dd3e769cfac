#!/usr/bin/env python3
"""Build the reference fixtures: small random-weight GPT-2 checkpoints and what transformers outputs.

Run in a venv outside the repo (CI never runs this; its outputs are committed):

    python3 -m venv ../venv && ../venv/bin/pip install -r scripts/requirements.txt
    ../venv/bin/python scripts/make_fixtures.py [models] [tokenizer] [generation] [sites] [formats]

Writes tests/fixtures/models/<name>/{config.json, weights, reference.safetensors} and
tests/fixtures/tokenizer/golden.json. Every number the Rust tests compare against comes from
transformers' GPT2LMHeadModel / GPT2TokenizerFast here.
"""

import json
import math
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


PROSE = (
    "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
    "tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side. During its "
    "construction, the Eiffel Tower surpassed the Washington Monument to become the tallest man-made "
    "structure in the world, a title it held for 41 years until the Chrysler Building in New York City was "
    "finished in 1930. It was the first structure to reach a height of 300 metres. Due to the addition of a "
    "broadcasting aerial at the top of the tower in 1957, it is now taller than the Chrysler Building by "
    "5.2 metres (17 ft). Excluding transmitters, the Eiffel Tower is the second tallest free-standing "
    "structure in France after the Millau Viaduct.\n\nThe tower has three levels for visitors, with "
    "restaurants on the first and second levels. The top level's upper platform is 276 m (906 ft) above the "
    "ground - the highest observation deck accessible to the public in the European Union."
)


def gpt2_tokenizer():
    assets = os.path.join(ROOT, "assets", "gpt2")
    tok = GPT2TokenizerFast(vocab=os.path.join(assets, "encoder.json"), merges=os.path.join(assets, "vocab.bpe"))
    # transformers 5 silently ignores vocab_file/merges_file; check that these files were used.
    assert tok("Hello world")["input_ids"] == [15496, 995], "tokenizer files were not used"
    return tok


def inputs_for(config, seed):
    """Two sequences (the full context, and a short one) and a text several contexts long."""
    if config.vocab_size == 50257:
        ids = torch.tensor(gpt2_tokenizer()(PROSE)["input_ids"])
        assert len(ids) >= 3 * config.n_positions, len(ids)
        # Full-vocabulary logits are 200 kB a row: keep the recorded sequences short.
        return [ids[:6].clone(), ids[:4].clone()], ids
    g = torch.Generator().manual_seed(seed + 1000)
    long = torch.randint(0, config.vocab_size, (config.n_positions,), generator=g)
    short = torch.randint(0, config.vocab_size, (7,), generator=g)
    text = torch.randint(0, config.vocab_size, (config.n_positions * 7 // 2,), generator=g)
    return [long, short], text


def strided_perplexity(model, ids, context, stride):
    """The perplexity guide's loop, counting exactly the tokens each window scores."""
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end]
        labels = window.clone()
        labels[:-trg_len] = -100
        logp = torch.log_softmax(model(window[None]).logits[0].float(), dim=-1)
        for t in range(1, len(window)):
            if labels[t] != -100:
                nll -= logp[t - 1, window[t]].double().item()
                scored += 1
        prev_end = end
        if end == len(ids):
            break
    # A window's first token has no prefix inside it: with stride == context those go unscored.
    assert scored <= len(ids) - 1
    return nll, scored


def record(name, directory, config, seed):
    """Reload the checkpoint the way a user would (in float32) and record what it outputs."""
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tensors = {}
    seqs, text = inputs_for(config, seed)
    with torch.no_grad():
        for i, ids in enumerate(seqs):
            logits = model(ids[None, :]).logits[0]
            tensors[f"input_ids.{i}"] = ids.to(torch.int64).contiguous()
            tensors[f"logits.{i}"] = logits.to(torch.float32).contiguous()
        # Evaluation: the next-token top 10 after the short sequence, the long one's per-token
        # log-probabilities, and strided perplexity over the text at two strides.
        logp = torch.log_softmax(model(seqs[1][None]).logits[0, -1].float(), dim=-1)
        top = torch.topk(logp, 10)
        tensors["top.ids"] = top.indices.to(torch.int64).contiguous()
        tensors["top.logprobs"] = top.values.contiguous()
        scored = text[: config.n_positions].clone()
        logp = torch.log_softmax(model(scored[None]).logits[0].float(), dim=-1)
        tensors["score.ids"] = scored.to(torch.int64).contiguous()
        tensors["score.logprobs"] = logp[:-1].gather(1, scored[1:, None])[:, 0].contiguous()
        tensors["ppl.ids"] = text.to(torch.int64).contiguous()
        c = config.n_positions
        for stride in (c, c // 2):
            nll, scored = strided_perplexity(model, text, c, stride)
            tensors[f"ppl.stride{stride}"] = torch.tensor([nll, scored, math.exp(nll / scored)], dtype=torch.float64)
    save_file(tensors, os.path.join(directory, "reference.safetensors"))
    print(f"{name}: recorded {len(seqs)} sequences, top-k, scores, perplexity at strides {c}, {c // 2}")


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
    # The real vocabulary, so that tests can go from text through the tokenizer to the model.
    make("full-vocab-f16", 7, "hf", dtype=torch.float16, n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=50257,
         bos_token_id=50256, eos_token_id=50256)


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
    tok = gpt2_tokenizer()
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok(text)["input_ids"]
        cases.append({"text": text, "ids": ids, "tokens": [tok.decode([i]) for i in ids]})
    os.makedirs(os.path.join(OUT, "tokenizer"), exist_ok=True)
    with open(os.path.join(OUT, "tokenizer", "golden.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "transformers.GPT2TokenizerFast", "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"tokenizer: {len(cases)} golden cases")


def load_fixture(name):
    directory = os.path.join(MODELS, name)
    model = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


GENERATION_CASES = [
    # (fixture, generate kwargs)
    ("openai-f32", dict(max_new_tokens=20)),
    ("openai-f32", dict(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)),
    ("headdim-24", dict(max_new_tokens=12)),
    ("scale-inv-layer", dict(max_new_tokens=10)),
    ("hf-bf16", dict(max_new_tokens=20, num_beams=4, num_return_sequences=2)),
    ("hf-bf16", dict(max_new_tokens=20, num_beams=4, length_penalty=0.5, early_stopping=True)),
    ("openai-f32", dict(max_new_tokens=16, num_beams=3, length_penalty=2.0, early_stopping="never", num_return_sequences=3)),
    ("sharded", dict(max_new_tokens=15, num_beams=5, num_return_sequences=2, no_repeat_ngram_size=2)),
    # End-of-sequence inside the output (random weights rarely pick the real one, so name another).
    ("openai-f32", dict(max_new_tokens=20, eos_token_id="pick")),
    ("hf-bf16", dict(max_new_tokens=20, num_beams=4, num_return_sequences=2, eos_token_id="pick")),
    ("hf-bf16", dict(max_new_tokens=20, num_beams=4, num_return_sequences=3, eos_token_id="pick", early_stopping=True)),
    ("openai-f32", dict(max_new_tokens=16, num_beams=3, eos_token_id="pick", early_stopping="never", length_penalty=0.7)),
    ("openai-f32", dict(max_new_tokens=16, num_beams=3, eos_token_id="pick", length_penalty=-0.5)),
    ("full-vocab-f16", dict(max_new_tokens=25)),
    ("full-vocab-f16", dict(max_new_tokens=20, num_beams=4, num_return_sequences=4)),
]


def make_generation():
    """transformers' generate() outputs: greedy and beam search, on several prompts per case."""
    cases = []
    for name, kwargs in GENERATION_CASES:
        model = load_fixture(name)
        cfg = model.config
        g = torch.Generator().manual_seed(len(cases))
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (1, 3, 6)]
        if cfg.vocab_size == 50257:
            tok = gpt2_tokenizer()
            prompts = [torch.tensor(tok(t)["input_ids"]) for t in ("The tower is", "Hello", "In 1957, a broadcasting aerial")]
        for prompt in prompts:
            run = lambda kw: model.generate(
                prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                pad_token_id=kw.get("eos_token_id", cfg.eos_token_id), return_dict_in_generate=True, output_scores=True,
                **kw,
            )
            kw = dict(kwargs)
            with torch.no_grad():
                if kw.get("eos_token_id") == "pick":
                    # An end-of-sequence the model will meet: the 4th token of an unconstrained run.
                    del kw["eos_token_id"]
                    gen = run(kw).sequences[0][len(prompt):]
                    kw["eos_token_id"] = int(gen[min(3, len(gen) - 1)])
                out = run(kw)
            seqs = []
            eos = kw.get("eos_token_id", cfg.eos_token_id)
            for i, seq in enumerate(out.sequences):
                gen = seq[len(prompt):].tolist()
                # Padding after the end: keep up to and including the first EOS.
                if eos in gen:
                    gen = gen[: gen.index(eos) + 1]
                score = float(out.sequences_scores[i]) if getattr(out, "sequences_scores", None) is not None else None
                seqs.append({"tokens": gen, "score": score})
            cases.append({"fixture": name, "kwargs": kw, "prompt": prompt.tolist(), "outputs": seqs})
    os.makedirs(os.path.join(OUT, "generation"), exist_ok=True)
    with open(os.path.join(OUT, "generation", "generate.json"), "w") as f:
        json.dump({"source": "transformers GPT2LMHeadModel.generate", "cases": cases}, f, indent=1)
    print(f"generation: {len(cases)} generate() cases")


def make_processors():
    """Each logits processor of transformers applied to fixed rows of logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(99)
    vocab = 1000
    scales = torch.tensor([1.0, 3.0, 8.0])[:, None]
    logits = torch.randn(3, vocab, generator=g) * scales
    context = torch.randint(0, vocab, (3, 24), generator=g)
    context[:, 20:] = context[:, 10:14]  # a repeated bigram for no_repeat_ngram
    tensors = {"logits": logits.contiguous(), "context": context.to(torch.int64).contiguous()}
    procs = {
        "repetition_penalty_1.3": RepetitionPenaltyLogitsProcessor(1.3),
        "repetition_penalty_0.8": RepetitionPenaltyLogitsProcessor(0.8),
        "temperature_0.7": TemperatureLogitsWarper(0.7),
        "top_k_40": TopKLogitsWarper(40),
        "top_p_0.9": TopPLogitsWarper(0.9),
        "top_p_0.3": TopPLogitsWarper(0.3),
        "min_p_0.05": MinPLogitsWarper(0.05),
        "no_repeat_ngram_2": NoRepeatNGramLogitsProcessor(2),
        "no_repeat_ngram_3": NoRepeatNGramLogitsProcessor(3),
    }
    for key, proc in procs.items():
        tensors[key] = proc(context, logits.clone()).contiguous()
    # The sampling chain in transformers' order.
    chain = [RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.8),
             TopKLogitsWarper(50), TopPLogitsWarper(0.95), MinPLogitsWarper(0.02)]
    x = logits.clone()
    for proc in chain:
        x = proc(context, x)
    tensors["chain"] = x.contiguous()
    save_file(tensors, os.path.join(OUT, "generation", "processors.safetensors"))
    print(f"processors: {len(procs) + 1} outputs on {len(logits)} rows")


FORMATS = os.path.join(OUT, "formats")


def tiny_vocab(size):
    """GPT-2's first `size - 1` tokens (the 256 bytes, then one per merge, in merge order) and
    <|endoftext|>: a byte-level vocabulary small enough to embed in every GGUF fixture."""
    assets = os.path.join(ROOT, "assets", "gpt2")
    enc = json.load(open(os.path.join(assets, "encoder.json"), encoding="utf-8"))
    dec = {v: k for k, v in enc.items()}
    merges = open(os.path.join(assets, "vocab.bpe"), encoding="utf-8").read().split("\n")[1 : size - 256]
    tokens = [dec[i] for i in range(size - 1)] + ["<|endoftext|>"]
    for i, m in enumerate(merges):
        a, b = m.split(" ")
        assert enc[a + b] == 256 + i and enc[a] < 256 + i and enc[b] < 256 + i, m
    return tokens, merges


def write_tokenizer(directory, tokens, merges, names=("vocab.json", "merges.txt")):
    with open(os.path.join(directory, names[0]), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, names[1]), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def fresh(*parts):
    d = os.path.join(FORMATS, *parts)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def make_formats():
    """One tiny model (2 layers, width 32, 300 tokens) in every format the engine reads: the Rust
    tests check that each gives the logits of the same weights in safetensors, bit for bit."""
    import numpy as np

    tokens, merges = tiny_vocab(300)
    cfg = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=300, bos_token_id=299, eos_token_id=299)
    config = GPT2Config(**cfg)
    torch.manual_seed(20)
    model = GPT2LMHeadModel(config)
    randomise(model, 20)
    sd = {k: v.contiguous() for k, v in model.transformer.state_dict().items() if not k.endswith(".attn.bias")}

    def lowered(dtype):
        # As llama.cpp's converter does: matrices (and embeddings) in the 16-bit type, vectors in f32.
        return {k: (v.to(dtype) if v.dim() == 2 else v) for k, v in sd.items()}

    for name, weights in (("tiny", sd), ("tiny-f16", lowered(torch.float16)), ("tiny-bf16", lowered(torch.bfloat16))):
        d = fresh(name)
        save_file(weights, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(d)
        os.remove(os.path.join(d, "generation_config.json")) if os.path.exists(os.path.join(d, "generation_config.json")) else None
        if name == "tiny":
            write_tokenizer(d, tokens, merges)

    # PyTorch: transformers' own state dict (`transformer.` prefix, lm_head sharing wte's storage).
    d = fresh("pytorch")
    config.save_pretrained(d)
    for f in os.listdir(d):
        if f != "config.json":
            os.remove(os.path.join(d, f))
    write_tokenizer(d, tokens, merges)
    full = model.state_dict()
    assert full["lm_head.weight"].data_ptr() == full["transformer.wte.weight"].data_ptr()
    torch.save(full, os.path.join(d, "pytorch_model.bin"))
    torch.save(full, os.path.join(d, "legacy.bin"), _use_new_zipfile_serialization=False)
    torch.save(lowered(torch.float16), os.path.join(d, "f16.bin"))
    torch.save(lowered(torch.bfloat16), os.path.join(d, "bf16.bin"))
    # Sharded, as save_pretrained(safe_serialization=False) writes it.
    d = fresh("pytorch-sharded")
    config.save_pretrained(d)
    for f in os.listdir(d):
        if f != "config.json":
            os.remove(os.path.join(d, f))
    write_tokenizer(d, tokens, merges)
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    weight_map = {}
    for f, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, os.path.join(d, f))
        weight_map.update({k: f for k in ks})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}, f, indent=1)

    make_tf(sd, cfg, tokens, merges)
    make_gguf(sd, cfg, tokens, merges, np)
    print(f"formats: tiny model in safetensors, PyTorch (zip, legacy, f16, bf16, sharded), TF, GGUF")


def make_tf(sd, cfg, tokens, merges):
    """OpenAI's original release layout: a TF1 Saver checkpoint, hparams.json, encoder.json + vocab.bpe."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    d = fresh("tf")
    tf1 = tf.compat.v1
    tf1.disable_eager_execution()
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for k, v in sd.items():
            a = v.numpy()
            parts = k.split(".")
            if parts[0] in ("wte", "wpe"):
                name = f"model/{parts[0]}"
            elif parts[0] == "ln_f":
                name = "model/ln_f/" + ("g" if parts[1] == "weight" else "b")
            else:
                i, rest = parts[1], parts[2:]
                leaf = {"weight": "w", "bias": "b"}[rest[-1]]
                if rest[0].startswith("ln_"):
                    leaf = {"w": "g", "b": "b"}[leaf]
                name = f"model/h{i}/" + "/".join(rest[:-1]) + "/" + leaf
                if leaf == "w":
                    a = a[None]  # OpenAI's conv1d weights are [1, nx, nf]
            variables.append(tf1.get_variable(name, initializer=tf.constant(a)))
        saver = tf1.train.Saver(variables)
        with tf1.Session(graph=graph) as s:
            s.run(tf1.global_variables_initializer())
            saver.save(s, os.path.join(d, "model.ckpt"), write_meta_graph=False)
    # As OpenAI's release: a relative path (the Saver wrote this machine's absolute one).
    with open(os.path.join(d, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    with open(os.path.join(d, "hparams.json"), "w") as f:
        json.dump({"n_vocab": cfg["vocab_size"], "n_ctx": cfg["n_positions"], "n_embd": cfg["n_embd"],
                   "n_head": cfg["n_head"], "n_layer": cfg["n_layer"]}, f, indent=2)
    write_tokenizer(d, tokens, merges, names=("encoder.json", "vocab.bpe"))


GGUF_NAMES = {
    "wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
}
GGUF_BLOCK = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def gguf_name(k):
    if k in GGUF_NAMES:
        return GGUF_NAMES[k]
    _, i, *rest = k.split(".")
    return f"blk.{i}.{GGUF_BLOCK['.'.join(rest[:-1])]}.{rest[-1]}"


def make_gguf(sd, cfg, tokens, merges, np):
    """What llama.cpp's convert_hf_to_gguf.py writes for GPT-2: Conv1D weights transposed to
    (out, in) so that ggml's first dimension is the input; f16 / q8_0 for matrices, f32 vectors."""
    import gguf

    d = fresh("gguf")
    for kind in ("f32", "f16", "q8_0"):
        w = gguf.GGUFWriter(os.path.join(d, f"tiny-{kind}.gguf"), "gpt2")
        w.add_name("tiny")
        w.add_context_length(cfg["n_positions"])
        w.add_embedding_length(cfg["n_embd"])
        w.add_feed_forward_length(4 * cfg["n_embd"])
        w.add_block_count(cfg["n_layer"])
        w.add_head_count(cfg["n_head"])
        w.add_layer_norm_eps(1e-5)
        w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[kind])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])
        w.add_token_merges(merges)
        w.add_bos_token_id(cfg["bos_token_id"])
        w.add_eos_token_id(cfg["eos_token_id"])
        for k, v in sd.items():
            a = v.numpy()
            if k.split(".")[-2] in ("c_attn", "c_proj", "c_fc") and k.endswith("weight"):
                a = np.ascontiguousarray(a.T)
            if a.ndim == 2 and kind == "f16":
                w.add_tensor(gguf_name(k), a.astype(np.float16))
            elif a.ndim == 2 and kind == "q8_0" and k != "wpe.weight":
                q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gguf_name(k), q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(gguf_name(k), a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


SITE_FIXTURES = ["openai-f32", "scale-inv-layer", "headdim-24"]


def capture_sites(model, ids, output_attentions=True):
    """Every TransformerLens site of GPT-2 as transformers computes it (forward hooks on its
    modules), plus the logits, hidden states and attentions transformers returns."""
    cfg = model.config
    t, nh = len(ids), cfg.n_head
    hd = cfg.n_embd // nh
    sites, handles = {}, []
    tr = model.transformer

    def out(name, f=lambda x: x):
        def hook(_m, _args, output):
            o = output[0] if isinstance(output, tuple) else output
            sites[name] = f(o[0].detach().clone())
        return hook

    def inp(name, f=lambda x: x):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            sites[name] = f(x[0].detach().clone())
        return hook

    heads = lambda x: x.reshape(t, nh, hd)
    handles.append(tr.wte.register_forward_hook(out("hook_embed")))
    handles.append(tr.wpe.register_forward_hook(out("hook_pos_embed")))
    for l, blk in enumerate(tr.h):
        b = f"blocks.{l}."
        handles.append(blk.register_forward_pre_hook(inp(b + "hook_resid_pre"), with_kwargs=True))
        handles.append(blk.ln_1.register_forward_hook(out(b + "ln1.hook_normalized")))

        def qkv_hook(_m, _a, o, b=b, l=l):
            q, k, v = o[0].detach().clone().split(cfg.n_embd, dim=-1)
            sites[b + "attn.hook_q"], sites[b + "attn.hook_k"], sites[b + "attn.hook_v"] = heads(q), heads(k), heads(v)
            qh, kh = q.reshape(t, nh, hd).transpose(0, 1), k.reshape(t, nh, hd).transpose(0, 1)
            scores = qh @ kh.transpose(-1, -2) / math.sqrt(hd)
            if cfg.scale_attn_by_inverse_layer_idx:
                scores = scores / float(l + 1)
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
            sites[b + "attn.hook_attn_scores"] = scores.masked_fill(mask, -math.inf)

        handles.append(blk.attn.c_attn.register_forward_hook(qkv_hook))
        handles.append(blk.attn.c_proj.register_forward_pre_hook(inp(b + "attn.hook_z", heads), with_kwargs=True))
        handles.append(blk.attn.c_proj.register_forward_hook(out(b + "hook_attn_out")))
        handles.append(blk.ln_2.register_forward_pre_hook(inp(b + "hook_resid_mid"), with_kwargs=True))
        handles.append(blk.ln_2.register_forward_hook(out(b + "ln2.hook_normalized")))
        handles.append(blk.mlp.c_fc.register_forward_hook(out(b + "mlp.hook_pre")))
        handles.append(blk.mlp.act.register_forward_hook(out(b + "mlp.hook_post")))
        handles.append(blk.mlp.c_proj.register_forward_hook(out(b + "hook_mlp_out")))
        handles.append(blk.register_forward_hook(out(b + "hook_resid_post")))
    handles.append(tr.ln_f.register_forward_hook(out("ln_final.hook_normalized")))
    try:
        with torch.no_grad():
            r = model(ids[None], output_hidden_states=True, output_attentions=output_attentions)
    finally:
        for h in handles:
            h.remove()
    for l, a in enumerate(r.attentions):
        sites[f"blocks.{l}.attn.hook_pattern"] = a[0].detach().clone()
    return r.logits[0].detach().clone(), sites, torch.stack([h[0] for h in r.hidden_states])


def patched_logits(model, ids, module, pre, replace):
    """Logits with one module's output (or, with `pre`, its input) replaced by `replace(x)`, as an
    activation-patching hook does."""
    def pre_hook(_m, args, kwargs):
        if args:
            return (replace(args[0][0])[None],) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = replace(kwargs["hidden_states"][0])[None]
        return args, kwargs

    def post_hook(_m, _a, output):
        if isinstance(output, tuple):
            return (replace(output[0][0])[None],) + tuple(output[1:])
        return replace(output[0])[None]

    h = module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre else module.register_forward_hook(post_hook)
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0].detach().clone()
    finally:
        h.remove()


def make_sites():
    """Activation sites, hidden states, attentions, embeddings and patched logits."""
    for name in SITE_FIXTURES:
        model = load_fixture(name)
        cfg = model.config
        tr = model.transformer
        seqs, _ = inputs_for(cfg, {"openai-f32": 1, "scale-inv-layer": 6, "headdim-24": 4}[name])
        ids = seqs[1]
        t, nh, hd = len(ids), cfg.n_head, cfg.n_embd // cfg.n_head
        logits, sites, hidden = capture_sites(model, ids)
        # A second prompt of the same length, to patch from.
        other = (ids * 7 + 3) % cfg.vocab_size
        _, other_sites, _ = capture_sites(model, other)
        tensors = {"input_ids": ids.to(torch.int64).contiguous(), "logits": logits, "hidden_states": hidden}
        for k, v in sites.items():
            tensors[f"site.{k}"] = v.contiguous()
        final = hidden[-1]
        tensors["embed.mean"] = torch.nn.functional.normalize(final.mean(0), dim=0)
        tensors["embed.last"] = torch.nn.functional.normalize(final[-1], dim=0)
        # Patches: (site, value as our API takes it, module, pre, replacement done by a hook).
        last = cfg.n_layer - 1
        z = sites[f"blocks.{last}.attn.hook_z"].clone()
        z[:, 1] = other_sites[f"blocks.{last}.attn.hook_z"][:, 1]
        post = sites["blocks.0.mlp.hook_post"]
        mean_post = post.mean(0, keepdim=True).expand_as(post).clone()
        v_site = sites["blocks.0.attn.hook_v"] * 0.5
        pre = sites[f"blocks.{last}.mlp.hook_pre"] * 0.9
        causal = torch.tril(torch.ones(t, t))
        uniform = (causal / causal.sum(-1, keepdim=True)).expand(nh, t, t).clone()

        def z_from_pattern(x, blk=tr.h[last]):
            # The uniform pattern applied to this layer's values, as the patched pattern would.
            v = sites[f"blocks.{last}.attn.hook_v"].transpose(0, 1)  # (nh, t, hd)
            return (uniform @ v).transpose(0, 1).reshape(t, nh * hd)

        def with_v(x):
            q, k, v = x.split(cfg.n_embd, dim=-1)
            return torch.cat([q, k, v_site.reshape(t, -1)], dim=-1)

        cases = [
            ("blocks.0.hook_resid_post", torch.zeros(t, cfg.n_embd), tr.h[0], False, lambda x: torch.zeros_like(x)),
            (f"blocks.{last}.attn.hook_z", z, tr.h[last].attn.c_proj, True, lambda x: z.reshape(t, -1)),
            ("blocks.0.mlp.hook_post", mean_post, tr.h[0].mlp.act, False, lambda x: mean_post),
            ("blocks.0.attn.hook_v", v_site, tr.h[0].attn.c_attn, False, with_v),
            (f"blocks.{last}.mlp.hook_pre", pre, tr.h[last].mlp.c_fc, False, lambda x: pre),
            (f"blocks.{last}.attn.hook_pattern", uniform, tr.h[last].attn.c_proj, True, z_from_pattern),
            ("hook_pos_embed", torch.zeros(t, cfg.n_embd), tr.wpe, False, lambda x: torch.zeros_like(x)),
        ]
        meta = {}
        for i, (site, value, module, is_pre, replace) in enumerate(cases):
            tensors[f"patch.{i}.value"] = value.contiguous()
            tensors[f"patch.{i}.logits"] = patched_logits(model, ids, module, is_pre, replace)
            meta[f"patch.{i}"] = site
        path = os.path.join(MODELS, name, "sites.safetensors")
        save_file({k: v.to(torch.float32).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}, path, metadata=meta)
        print(f"{name}: {len(sites)} sites, {len(cases)} patches for {t} tokens")


if __name__ == "__main__":
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    only = sys.argv[1:]
    if not only or "models" in only:
        make_models()
    if not only or "tokenizer" in only:
        make_tokenizer_golden()
    if not only or "generation" in only:
        make_generation()
        make_processors()
    if not only or "sites" in only:
        make_sites()
    if "formats" in only:  # new fixtures only: run with `formats` (needs tensorflow-cpu and gguf)
        make_formats()
