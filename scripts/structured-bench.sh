#!/usr/bin/env bash
# The cost of structured output on `gpt2 serve`: random weights at PRESET's shape stored as DTYPE,
# --parallel 8, closed-loop streaming clients (scripts/structured_load.py) at C = 1 and C = 8,
# unconstrained and with a five-field JSON schema (vLLM's guided_json), in alternated rounds
# (A B A B ...) so that a machine's drift falls on both; prints every round, then the medians.
# usage: scripts/structured-bench.sh [PRESET] [DTYPE] [ROUNDS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-gpt2} dtype=${2:-q8} rounds=${3:-5} threads=${4:-2}
bin=target/release/gpt2
tmp=$(mktemp -d)
$bin serve --random "$preset" --dtype "$dtype" --parallel 8 --threads "$threads" --port 0 \
    >"$tmp/out" 2>"$tmp/err" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
until url=$(sed -n 's/^listening on //p' "$tmp/out") && [ -n "$url" ]; do sleep 0.2; done
load() { python3 scripts/structured_load.py "$url/v1/completions" --model "$preset" "$@"; }
# Warm-up: the compiler's token trie, the schema's lexer, the model's pages.
load --concurrency 1 --requests 1 --max-tokens 16 --constraint json >/dev/null
load --concurrency 1 --requests 1 --max-tokens 16 >/dev/null
for r in $(seq "$rounds"); do
    for c in 1 8; do
        n=$(( c == 1 ? 3 : 16 ))
        for k in none json; do
            echo "round $r C=$c $(load --concurrency $c --requests $n --max-tokens 64 --constraint $k)"
        done
    done
done | tee "$tmp/rounds"
python3 - "$tmp/rounds" <<'PY'
import json, statistics, sys
rows = [l.split(" ", 3) for l in open(sys.argv[1])]
for c in ("C=1", "C=8"):
    med = {}
    for k in ("none", "json"):
        v = [json.loads(r[3]) for r in rows if r[2] == c and json.loads(r[3])["constraint"] == k]
        med[k] = statistics.median(x["tok_s"] for x in v)
        per = statistics.median(x["tokens_per_request"] for x in v)
        print(f"{c} {k}: median {med[k]:.2f} tok/s over {len(v)} rounds, {per:.0f} tokens/request")
    print(f"{c} json / none: {med['json'] / med['none']:.3f}")
PY
