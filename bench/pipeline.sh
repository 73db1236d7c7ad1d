#!/usr/bin/env bash
# The pipeline bubble on this machine: `--pp P` with M micro-batches, each stage's idle share
# of the step (time spent waiting for messages) against 1F1B's theory (P−1)/(M+P−1) for equal
# stages, and the throughput against one process with the same micro-batches on the same cores
# (min(P, cores) threads).
#
#   bench/pipeline.sh [--model mnist-dits] [--depth 4] [--steps 10] [--batch 64]
#
# One thread per rank; with more ranks than cores (P=4 on two cores) the ranks share cores and
# idle time includes waiting for a core. Measured idle also holds what the theory leaves out:
# moving the messages, and unequal stages (the first stage runs the embeddings, the last the
# final layer and the loss).
set -euo pipefail
cd "$(dirname "$0")/.."

model=mnist-dits depth=4 steps=10 batch=64
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --depth) depth=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
source bench/mpi_setup.sh
args=(--model "$model" --depth "$depth" --steps "$steps" --batch "$batch" --no-progress
  --checkpoint-every 1000000 --log-every 1000000)

echo "cores=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\" model=$model depth=$depth batch=$batch steps=$steps"
printf '%-3s %-4s %12s %16s %10s   %s\n' P M samples/s one_process/s theory idle_per_stage
for layout in 2,1 2,2 2,4 2,8 4,4 4,8; do
  IFS=, read -r p m <<<"$layout"
  cores=$(( p < $(nproc) ? p : $(nproc) ))
  one=$("$dits" train "${args[@]}" --threads "$cores" --micro-batches "$m" --out "$tmp/one-$p-$m" 2>&1 | grep -o '([0-9.]* samples/s' | tr -d '(' | cut -d' ' -f1)
  log=$(mpirun $root --oversubscribe --bind-to none -np "$p" "$dits" train --dist mpi --pp "$p" --threads 1 "${args[@]}" \
    --micro-batches "$m" --out "$tmp/pp-$p-$m" 2>&1) || { echo "$log" >&2; exit 1; }
  rate=$(grep -o '([0-9.]* samples/s' <<<"$log" | tr -d '(' | cut -d' ' -f1)
  theory=$(grep -o '(P−1)/(M+P−1) = [0-9.]*%' <<<"$log" | awk '{print $3}')
  idle=$(grep -o 'idle [0-9.]*%' <<<"$log" | awk '{print $2}' | paste -sd' ')
  printf '%-3s %-4s %12s %16s %10s   %s\n' "$p" "$m" "$rate" "$one" "$theory" "$idle"
done
