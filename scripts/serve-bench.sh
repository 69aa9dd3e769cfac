#!/usr/bin/env bash
# Load figures for `gpt2 serve`: random weights at PRESET's shape stored as DTYPE, --parallel 8,
# closed-loop streaming clients at C = 1, 8, 32 (100-word prompts, 128 tokens, temperature 0,
# ignore_eos), then the server's peak RSS. usage: scripts/serve-bench.sh PRESET DTYPE [REQUESTS_PER_CLIENT]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=$1 dtype=$2 per=${3:-2}
bin=target/release/gpt2
tmp=$(mktemp -d)
$bin serve --random "$preset" --dtype "$dtype" --parallel 8 --port 0 >"$tmp/out" 2>"$tmp/err" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
until url=$(sed -n 's/^listening on //p' "$tmp/out") && [ -n "$url" ]; do sleep 0.2; done
cat "$tmp/err"
$bin serve-bench --url "$url" --concurrency 1 --requests 1 --max-tokens 8 >/dev/null  # warm-up
for c in 1 8 32; do
    r=$(( c * per )); [ "$c" = 1 ] && r=$(( per * 2 ))
    echo "$preset $dtype C=$c: $($bin serve-bench --url "$url" --concurrency "$c" --requests "$r" --json)"
done
if [ -n "${SERVE_LOAD:-}" ]; then
    for c in 8 32; do
        echo "$preset $dtype serve_load.py C=$c: $(python3 "$SERVE_LOAD" "$url/v1/completions" --concurrency "$c" --requests $(( c * per )) --model "$preset")"
    done
fi
echo "$preset $dtype peak RSS: $(grep VmHWM /proc/$pid/status)"
