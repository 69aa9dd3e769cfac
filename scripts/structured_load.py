#!/usr/bin/env python3
"""Closed-loop load on /v1/completions with or without structured output, as
../shared/tools/serve_load.py does it (C client threads sending streaming requests back to back,
temperature 0, ignore_eos), plus `--constraint json`: every request carries vLLM's `guided_json`
with a schema of five fields. A constrained reply ends when its JSON is complete, so it may have
fewer tokens than --max-tokens: tokens/s counts the tokens generated (usage), and the line says
how many each request had. Standard library only; loopback targets only.

usage: structured_load.py URL --concurrency C --requests N [--max-tokens T] [--prompt-words W]
                          [--constraint none|json]
"""
import argparse, json, statistics, threading, time, urllib.parse

import sse_client

WORDS = ("the of and to in is was for on that with as by at from his her an which or were are this be "
         "had it not but have they one their all also been has new more after first two time who its").split()

# Five fields, as the goal names them: strings, an integer, a boolean, an enum.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "city", "member", "color"],
    "additionalProperties": False,
}


def prompt_of(words, k):
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for i in range(words))


def one_request(url, body):
    c, r, t0 = sse_client.post(url, urllib.parse.urlparse(url).path, body)
    n, text = 0, []
    for ev in sse_client.events(r):
        for ch in ev.get("choices", []):
            text.append(ch.get("text") or "")
        usage = ev.get("usage") or {}
        if usage.get("completion_tokens"):
            n = usage["completion_tokens"]
    c.close()
    return time.perf_counter() - t0, n, "".join(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--constraint", choices=["none", "json"], default="none")
    ap.add_argument("--model", default="gpt2")
    a = ap.parse_args()
    if urllib.parse.urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback targets only")
    lock, results, errors, sent = threading.Lock(), [], [], [0]

    def worker(k):
        i = 0
        while True:
            with lock:
                if sent[0] >= a.requests:
                    return
                sent[0] += 1
            body = {"model": a.model, "prompt": prompt_of(a.prompt_words, k * 1000 + i),
                    "max_tokens": a.max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            if a.constraint == "json":
                body["guided_json"] = SCHEMA
            i += 1
            try:
                res = one_request(a.url, body)
                with lock:
                    results.append(res)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(str(e)[:200])

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a.concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(r[1] for r in results)
    valid = 0
    for _, _, text in results:
        try:
            valid += isinstance(json.loads(text), dict)
        except ValueError:
            pass
    print(json.dumps({"constraint": a.constraint, "concurrency": a.concurrency,
                      "requests": len(results), "errors": len(errors),
                      "first_error": errors[0] if errors else None, "tokens": toks,
                      "tok_s": round(toks / wall, 2), "wall_s": round(wall, 2),
                      "tokens_per_request": round(statistics.mean(r[1] for r in results), 1) if results else 0,
                      "json_objects": valid}))


if __name__ == "__main__":
    main()
