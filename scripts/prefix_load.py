#!/usr/bin/env python3
"""The prefix cache's two loads on an OpenAI-compatible server (ours with and without
--no-prefix-cache, or any other), standard library only, loopback targets only.

mc:   multiple-choice questions as lm-evaluation-harness sends them: each request is a shared
      context of --context token ids plus one of --answers endings of --answer-len ids, echo with
      logprobs 1, max_tokens 0; --questions questions, their requests in order, taken by
      --clients closed-loop clients. Prints the wall time, requests/s, and a hash of every reply's
      log-probs (equal hashes: equal replies, bit for bit).
chat: a --turns-turn conversation on /v1/chat/completions, each turn resending the history with the
      reply so far; prints each turn's time to first token (streamed) and the last turn's.

usage: prefix_load.py URL mc|chat [options]; prints one JSON line.
"""
import argparse, hashlib, json, random, threading, time, urllib.parse

import sse_client


def post(url, path, body, stream=False):
    c, r, t0 = sse_client.post(url, path, body)
    if not stream:
        v = json.loads(r.read())
        c.close()
        return v, None
    ttft, text = None, []
    for ev in sse_client.events(r):
        for ch in ev.get("choices", []):
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    c.close()
    return "".join(text), ttft


def mc(a):
    rng = random.Random(a.seed)
    reqs = []
    for _ in range(a.questions):
        context = [rng.randrange(50000) for _ in range(a.context)]
        for _ in range(a.answers):
            ending = [rng.randrange(50000) for _ in range(a.answer_len)]
            reqs.append({"prompt": context + ending, "max_tokens": 0, "echo": True,
                         "logprobs": 1, "temperature": 0})
    replies = [None] * len(reqs)
    nxt = iter(range(len(reqs)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            v, _ = post(a.url, "/v1/completions", reqs[i])
            replies[i] = v["choices"][0]["logprobs"]

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    digest = hashlib.sha256(json.dumps(replies, sort_keys=True).encode()).hexdigest()[:16]
    return {"load": "mc", "requests": len(reqs), "wall_s": round(wall, 3),
            "requests_per_s": round(len(reqs) / wall, 2), "replies_sha256": digest}


def chat(a):
    rng = random.Random(a.seed)
    words = "the of and to in is was for on that with as by at from his her which or were are".split()
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))
    messages = [{"role": "system", "content": say(a.system_words)}]
    ttfts = []
    for turn in range(a.turns):
        messages.append({"role": "user", "content": say(a.user_words)})
        text, ttft = post(a.url, "/v1/chat/completions",
                          {"messages": messages, "max_tokens": a.reply_tokens, "stream": True,
                           "temperature": 0, "seed": turn}, stream=True)
        ttfts.append(round(ttft, 4))
        messages.append({"role": "assistant", "content": text})
    return {"load": "chat", "turns": a.turns, "ttft_s": ttfts, "last_ttft_s": ttfts[-1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("load", choices=["mc", "chat"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--answers", type=int, default=4)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--answer-len", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-words", type=int, default=100)
    ap.add_argument("--user-words", type=int, default=20)
    ap.add_argument("--reply-tokens", type=int, default=40)
    a = ap.parse_args()
    host = urllib.parse.urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{a.url}: loopback targets only")
    print(json.dumps(mc(a) if a.load == "mc" else chat(a)))


if __name__ == "__main__":
    main()
