#!/usr/bin/env bash
# The README's load figures of `dits serve`: start the server on a checkpoint (a free port of
# the loopback address), send it a bounded load from examples/serve_load.rs, stop it with
# SIGTERM, print what each side counted.
#
#   bench/serve_load.sh [--checkpoint runs/mnist] [--clients 20] [--requests 200] [--max-n 4]
#                       [--steps 20] [--threads 2] [-- more dits serve flags]
set -euo pipefail
cd "$(dirname "$0")/.."

checkpoint=runs/mnist clients=20 requests=200 max_n=4 steps=20 threads=2 serve_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --checkpoint) checkpoint=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --max-n) max_n=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --) shift; serve_flags=("$@"); break ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -e "$checkpoint" ] || { echo "error: checkpoint $checkpoint not found (train one: cargo run --release -- train)" >&2; exit 1; }

cargo build --release -q --bin dits --example serve_load
echo "cores=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\" checkpoint=$checkpoint"
log=$(mktemp)
./target/release/dits serve --checkpoint "$checkpoint" --port 0 --threads "$threads" "${serve_flags[@]}" >"$log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do grep -q '^listening on' "$log" && break; sleep 0.1; done
url=$(grep -o 'http://[^/ ]*' "$log" | head -1)
[ -n "$url" ] || { echo "error: the server did not start" >&2; exit 1; }
status=0
./target/release/examples/serve_load "$url" --clients "$clients" --requests "$requests" --max-n "$max_n" \
  --steps "$steps" || status=$?
kill -TERM "$pid"
wait "$pid" || true
tail -n +2 "$log"
exit "$status"
