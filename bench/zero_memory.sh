#!/usr/bin/env bash
# Per-rank memory of the training state at ZeRO 0/1/2/3 on 1, 2 and 4 MPI ranks, beside the
# ZeRO paper's formulas (Rajbhandari et al. 2020, fp32 training: Ψ parameters; weights 4Ψ,
# gradients 4Ψ, Adam's two moments 8Ψ bytes; ZeRO-1 divides the moments by N, ZeRO-2 the
# gradients too, ZeRO-3 the weights too).
#
#   bench/zero_memory.sh [--models "mnist-dits dit-s2 dit-b2"]
#
# dits counts what a rank holds at the peak of a step: ZeRO-2 keeps its gradient shard plus the
# one piece (embeddings, a block, the final layer) whose gradient is being reduced; ZeRO-3 its
# weight shard plus the shell (embeddings and final layer) and one gathered block. The paper's
# formulas leave those working buffers out, so dits' columns sit a piece above them. Each run
# is 2 steps of batch 8; rank 0's figures are printed, with its peak RSS (the activations, the
# model's own tensors and the binary included). "dit-b2" is dit-s2 widened to 8 heads of 64
# (width 512), where the state dwarfs the rest.
set -euo pipefail
cd "$(dirname "$0")/.."

models="mnist-dits dit-s2 dit-b2"
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
source bench/mpi_setup.sh

echo "cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
for model in $models; do
  case "$model" in
    dit-b2) args=(--model dit-s2 --heads 8 --head-dim 64) ;;
    *) args=(--model "$model") ;;
  esac
  echo
  echo "model=$model"
  printf '%-5s %-4s | %9s %9s %9s | %9s %9s %9s | %8s\n' ranks zero params grads optim \
    paper_p paper_g paper_o rss_MiB
  for n in 1 2 4; do
    for zero in 0 1 2 3; do
      out="$tmp/$model-$n-$zero"
      log=$(mpirun $root --oversubscribe --bind-to none -np "$n" "$dits" train --dist mpi --zero "$zero" "${args[@]}" \
        --out "$out" --steps 2 --batch 8 --threads 1 --micro-batches 1 --no-progress \
        --checkpoint-every 1000000 --log-every 1000000 2>&1) || { echo "$log" >&2; exit 1; }
      psi=$(grep -o 'training [0-9]* parameters' <<<"$log" | head -1 | cut -d' ' -f2)
      read -r p g o rss < <(grep -o 'rank 0: parameters [0-9.]* MiB, gradients [0-9.]* MiB, optimizer state [0-9.]* MiB, peak RSS [0-9]*' <<<"$log" \
        | awk '{print $4, $7, $11, $15}')
      # The paper's per-rank bytes, in MiB.
      read -r pp pg po < <(awk -v psi="$psi" -v n="$n" -v z="$zero" 'BEGIN {
        m = 1048576; p = 4 * psi; g = 4 * psi; o = 8 * psi
        if (z >= 1) o /= n; if (z >= 2) g /= n; if (z >= 3) p /= n
        printf "%.2f %.2f %.2f\n", p / m, g / m, o / m }')
      printf '%-5s %-4s | %9s %9s %9s | %9s %9s %9s | %8s\n' "$n" "$zero" "$p" "$g" "$o" "$pp" "$pg" "$po" "$rss"
    done
  done
done
