#!/usr/bin/env bash
# `gpt2 serve` beside gpt2rs.serve (Ray Serve) under the same closed-loop streaming load
# (../shared/tools/serve_load.py), alternating A, B, A, B ... so that a shared machine's drift
# falls on both. Usage (from the repository root, gpt2rs and ray[serve] installed in $PY's venv):
#   python/bench/ray_serve_load.sh overhead ROUNDS   # gpt2 serve --parallel 8 --threads 2 vs 1 replica x 2 threads, C=8
#   python/bench/ray_serve_load.sh scaling ROUNDS    # Ray Serve 1 replica x 1 thread vs 2 replicas x 1 thread, C=16
# Each line printed is serve_load.py's JSON with the setup's name in front. PYTHONPATH=python
# runs this checkout's gpt2rs (built in place by `maturin develop`) before any other installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-overhead}
rounds=${2:-3}
PY=${PY:-python3}
LOAD=${SERVE_LOAD:-../shared/tools/serve_load.py}
DURATION=${DURATION:-30}
PORT=${PORT:-8391}
STREAM_INTERVAL=${STREAM_INTERVAL:-1}
GPT2=${GPT2:-target/release/gpt2}
url=http://127.0.0.1:$PORT/v1/completions

wait_up() {
    for _ in $(seq 600); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "the server did not come up" >&2
    return 1
}

stop() {  # pid: Ctrl-C, then (after 60 s) SIGTERM
    kill -INT "$1" 2>/dev/null || true
    for _ in $(seq 120); do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" || true
}

run_gpt2() {  # threads concurrency
    "$GPT2" serve --random gpt2 --dtype q8 --parallel 8 --threads "$1" --port "$PORT" \
        --no-access-log >/dev/null 2>&1 &
    local pid=$!
    wait_up
    echo "gpt2-serve-t$1 $($PY "$LOAD" "$url" --concurrency "$2" --duration "$DURATION")"
    stop "$pid"
}

run_ray() {  # replicas threads concurrency
    $PY -m gpt2rs.serve --random gpt2 --dtype q8 --replicas "$1" --threads "$2" --parallel 8 \
        --port "$PORT" --num-cpus 2 --stream-interval "$STREAM_INTERVAL" >/tmp/ray_serve_load.log 2>&1 &
    local pid=$!
    wait_up
    # Warm every replica's first requests out of the figures.
    $PY "$LOAD" "$url" --concurrency "$3" --requests "$3" --max-tokens 4 >/dev/null
    echo "ray-r$1-t$2 $($PY "$LOAD" "$url" --concurrency "$3" --duration "$DURATION")"
    stop "$pid"
    sleep 2
}

for _ in $(seq "$rounds"); do
    case $what in
        overhead) run_gpt2 2 8; run_ray 1 2 8 ;;
        scaling) run_ray 1 1 16; run_ray 2 1 16 ;;
        *) echo "overhead or scaling" >&2; exit 2 ;;
    esac
done
