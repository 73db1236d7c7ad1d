#!/usr/bin/env bash
# dits vs the PyTorch reference of mnist-dits, in the same run, on the same machine.
#
#   bench/compare_torch.sh [--batch 256] [--threads 2] [--iters 20] [--rounds 1]
#                          [--also "dit-s4"] [--isa native|avx2]
#
# --isa avx2 measures, on an AVX-512 machine, what an AVX2-only CPU runs: dits built without
# gemm's AVX-512 code (--no-default-features) and its kernels capped (DITS_CPU_CAPABILITY=avx2),
# PyTorch with ATen, MKL and oneDNN capped alike. The same cores run both, so the ratio is the
# code's; the absolute figures are not an AVX2 CPU's (its clocks, caches and ports differ).
#
# Installs torch into bench/.venv on first use (or set DITS_TORCH_PYTHON to a python with
# torch). Runs dits and PyTorch alternately --rounds times and prints the median of each,
# their ratios, and each process's peak RSS; then dits alone on the presets in --also (the
# reference exists for mnist-dits only).
set -euo pipefail
cd "$(dirname "$0")/.."

batch=256 threads=2 iters=20 rounds=1 also="dit-s4" isa=native
while [ $# -gt 0 ]; do
  case "$1" in
    --batch) batch=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --also) also=$2; shift 2 ;;
    --isa) isa=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done

ref=../shared/bench/torch_ref_mnist_dits.py
[ -f "$ref" ] || { echo "error: $ref not found (../shared must sit beside the repo)" >&2; exit 1; }
py=${DITS_TORCH_PYTHON:-bench/.venv/bin/python}
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "installing torch into bench/.venv (a large download, once)" >&2
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q torch
  py=bench/.venv/bin/python
fi
dits_env=() torch_env=()
case "$isa" in
  native)
    cargo build --release -q
    dits=./target/release/dits ;;
  avx2)
    grep -qw avx2 /proc/cpuinfo || { echo "error: --isa avx2 needs a CPU with AVX2" >&2; exit 1; }
    # The AVX2 build shares target/ (only the crates gemm's feature touches are rebuilt); it is
    # copied aside and the default binary rebuilt, so target/release/dits stays the default.
    cargo build --release -q --no-default-features
    cp target/release/dits target/release/dits-avx2
    cargo build --release -q
    dits=./target/release/dits-avx2
    dits_env=(DITS_CPU_CAPABILITY=avx2)
    torch_env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) ;;
  *) echo "error: --isa takes native or avx2, not $isa" >&2; exit 2 ;;
esac

# Peak RSS in MiB of a command, from GNU time, with the command's stdout in $out.
run_measured() {
  local tf; tf=$(mktemp)
  out=$(/usr/bin/time -f '%M' -o "$tf" "$@")
  rss=$(awk '{printf "%.0f", $1/1024}' "$tf"); rm -f "$tf"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {print (b > 0 ? a / b : 0)}'; }

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

d_train=() d_sample=() t_train=() t_infer=()
for r in $(seq "$rounds"); do
  run_measured env "${dits_env[@]}" RAYON_NUM_THREADS="$threads" "$dits" bench --batch "$batch" --threads "$threads" --iters "$iters"
  d_train+=("$(sed -n 's/^train_samples_per_s=//p' <<<"$out")")
  d_sample+=("$(sed -n 's/^sample_images_per_s=//p' <<<"$out")")
  d_rss=$rss
  dits_out=$out
  run_measured env "${torch_env[@]}" OMP_NUM_THREADS="$threads" "$py" "$ref" --threads "$threads" --batch "$batch" --steps "$iters" --what train,infer
  t_train+=("$(sed -n 's/^train .*samples\/s=\([0-9.]*\).*/\1/p' <<<"$out")")
  t_infer+=("$(sed -n 's/^infer .*samples\/s=\([0-9.]*\).*/\1/p' <<<"$out")")
  t_rss=$rss
  torch_version=$(head -1 <<<"$out")
done

dt=$(printf '%s\n' "${d_train[@]}" | median); ds=$(printf '%s\n' "${d_sample[@]}" | median)
tt=$(printf '%s\n' "${t_train[@]}" | median); ti=$(printf '%s\n' "${t_infer[@]}" | median)
echo "batch=$batch threads=$threads iters=$iters rounds=$rounds cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
echo "pytorch: $torch_version, ATen CPU capability $(env "${torch_env[@]}" "$py" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())' 2>/dev/null)${torch_env[*]:+ (${torch_env[*]})}"
grep '^cpu:' <<<"$dits_out" | sed 's/^/dits /'
printf '%-28s %12s %12s %8s\n' "" dits pytorch ratio
printf '%-28s %12.1f %12.1f %8.2f\n' "train samples/s" "$dt" "$tt" "$(ratio "$dt" "$tt")"
printf '%-28s %12.1f %12.1f %8.2f\n' "sampling images/s (fwd)" "$ds" "$ti" "$(ratio "$ds" "$ti")"
printf '%-28s %12s %12s %8.2f\n' "peak RSS MiB" "$d_rss" "$t_rss" "$(ratio "$d_rss" "$t_rss")"
# Each round's own ratio too: the host's speed drifts between rounds, and a round's two runs,
# a minute apart, share more of its state than the medians of all rounds do.
per_round() { local -n a=$1 b=$2; for i in "${!a[@]}"; do printf ' %.2f' "$(ratio "${a[$i]}" "${b[$i]}")"; done; }
echo "ratio per round: train$(per_round d_train t_train); sampling$(per_round d_sample t_infer)"
grep '^achieved' <<<"$dits_out" | sed 's/^/dits mnist-dits /'
for preset in $also; do
  out=$(env "${dits_env[@]}" RAYON_NUM_THREADS="$threads" "$dits" bench --model "$preset" --batch "$batch" --threads "$threads" --iters "$iters")
  echo "dits $preset: train $(sed -n 's/^train_samples_per_s=//p' <<<"$out") samples/s, sampling $(sed -n 's/^sample_images_per_s=//p' <<<"$out") images/s; $(grep '^achieved' <<<"$out")"
done
