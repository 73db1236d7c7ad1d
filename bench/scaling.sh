#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same training run on 1, 2 and 4 MPI ranks.
#
#   bench/scaling.sh [--steps 20] [--batch 256] [--model mnist-dits] [--ranks "1 2 4"] [--cores 2]
#
# Builds dits with --features mpi, then for each rank count runs `mpirun -np N dits train
# --dist mpi` (oversubscribed past the cores, --cores/N threads per rank, at least 1) with DDP
# and with ZeRO-1 (`--bind-to none`: OpenMPI would otherwise pin a rank to one core, its threads
# too), and prints per run: training samples/s (whole loop, final checkpoint
# included), rank 0's wall time inside collectives vs the rest, bytes rank 0 sent per step,
# and the optimizer state each rank keeps.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=20 batch=256 model=mnist-dits ranks="1 2 4" cores=2
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v mpirun >/dev/null || { echo "error: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
cargo build --release -q --features mpi
dits=$PWD/target/release/dits
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
root=$([ "$(id -u)" = 0 ] && echo --allow-run-as-root || true)
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none

echo "model=$model batch=$batch (global) steps=$steps cores=$cores cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
printf '%-6s %-6s %-8s %12s %10s %10s %12s %14s\n' ranks zero threads samples/s comm_s total_s MB/step opt_MiB/rank
for n in $ranks; do
  threads=$(( cores / n )); [ "$threads" -ge 1 ] || threads=1
  for zero in 0 1; do
    out="$tmp/run-$n-$zero"
    log=$(mpirun $root --oversubscribe --bind-to none -np "$n" "$dits" train --dist mpi --zero "$zero" --model "$model" \
      --out "$out" --steps "$steps" --batch "$batch" --threads "$threads" --no-progress \
      --checkpoint-every 1000000 --log-every 1000000 2>&1)
    rate=$(grep -o '([0-9.]* samples/s' <<<"$log" | tr -d '(' | cut -d' ' -f1)
    params=$(grep -o 'training [0-9]* parameters' <<<"$log" | cut -d' ' -f2)
    if [ "$n" -gt 1 ]; then
      comm=$(grep -o 'rank 0: [0-9.]* s of [0-9.]* s' <<<"$log" | awk '{print $3, $6}')
      mb=$(grep -o '[0-9.]* MB sent per step' <<<"$log" | head -1 | cut -d' ' -f1)
      opt=$(grep -o 'optimizer state [A-Za-z]*: [0-9.]* MiB' <<<"$log" | awk '{print $4}')
    else
      comm="0 -" mb=0 opt=$(awk -v p="$params" 'BEGIN{printf "%.2f", 8*p/1048576}')
    fi
    printf '%-6s %-6s %-8s %12s %10s %10s %12s %14s\n' "$n" "$zero" "$threads" "$rate" ${comm} "$mb" "$opt"
  done
done
