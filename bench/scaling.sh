#!/usr/bin/env bash
# Parallel layouts on this machine: the same training run on 1, 2 and 4 MPI ranks, data
# parallel (DDP, ZeRO-1), tensor parallel (Megatron), sequence parallel (Ulysses) and grids.
#
#   bench/scaling.sh [--models "mnist-dits dit-s2"] [--cores 2]
#
# Builds dits with --features mpi, then for each model and layout runs `mpirun -np N dits
# train --dist mpi` (oversubscribed past the cores, --cores/N threads per rank, at least 1;
# `--bind-to none`: OpenMPI would otherwise pin a rank to one core, its threads too) and
# prints: training samples/s (whole loop, final checkpoint included), rank 0's wall time inside
# collectives vs the whole loop, bytes rank 0 sent per step (the start-up broadcast of the run
# included), and rank 0's memory: parameters, gradients (the flat vector), optimizer state,
# peak RSS. mnist-dits runs 20 steps of batch 256, dit-s2 (10x the FLOPs per image) 6 steps of
# batch 32.
set -euo pipefail
cd "$(dirname "$0")/.."

models="mnist-dits dit-s2" cores=2
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models=$2; shift 2 ;;
    --cores) cores=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
source bench/mpi_setup.sh

# Layouts: ranks, TP, SP, ZeRO stage.
layouts_mnist="1,1,1,0 2,1,1,0 2,1,1,1 2,2,1,0 4,1,1,0 4,1,1,1 4,2,1,0 4,2,1,1 4,4,1,0"
layouts_dit="1,1,1,0 2,1,1,0 2,1,1,1 2,2,1,0 2,1,2,0 4,1,1,0 4,1,1,1 4,2,1,0 4,1,2,0 4,1,2,1"

echo "cores=$cores cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
for model in $models; do
  case "$model" in
    mnist-dits) steps=20 batch=256 layouts=$layouts_mnist ;;
    *) steps=6 batch=32 layouts=$layouts_dit ;;
  esac
  echo
  echo "model=$model batch=$batch (global) steps=$steps"
  printf '%-6s %-4s %-4s %-4s %-4s %-8s %10s %14s %9s %10s %9s %9s %8s\n' \
    ranks dp tp sp zero threads samples/s comm/total_s MB/step params_MiB grads_MiB opt_MiB rss_MiB
  for layout in $layouts; do
    IFS=, read -r n tp sp zero <<<"$layout"
    dp=$(( n / (tp * sp) ))
    threads=$(( cores / n )); [ "$threads" -ge 1 ] || threads=1
    out="$tmp/$model-$n-$tp-$sp-$zero"
    log=$(mpirun $root --oversubscribe --bind-to none -np "$n" "$dits" train --dist mpi --tp "$tp" --sp "$sp" \
      --zero "$zero" --model "$model" --out "$out" --steps "$steps" --batch "$batch" --threads "$threads" \
      --micro-batches 1 --no-progress --checkpoint-every 1000000 --log-every 1000000 2>&1)
    rate=$(grep -o '([0-9.]* samples/s' <<<"$log" | tr -d '(' | cut -d' ' -f1)
    if [ "$n" -gt 1 ]; then
      comm=$(grep -o 'rank 0: [0-9.]* s of [0-9.]* s' <<<"$log" | awk '{print $3 "/" $6}')
      mb=$(grep -o '[0-9.]* MB sent per step' <<<"$log" | head -1 | cut -d' ' -f1)
    else
      comm="-" mb=0
    fi
    mem=$(grep -o 'rank 0: parameters [0-9.]* MiB, gradients [0-9.]* MiB, optimizer state [0-9.]* MiB, peak RSS [0-9]*' <<<"$log" \
      | awk '{print $4, $7, $11, $15}')
    printf '%-6s %-4s %-4s %-4s %-4s %-8s %10s %14s %9s %10s %9s %9s %8s\n' \
      "$n" "$dp" "$tp" "$sp" "$zero" "$threads" "$rate" "$comm" "$mb" $mem
  done
done
