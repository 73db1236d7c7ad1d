#!/usr/bin/env bash
# The quality table of the README: model preset × training minutes × sampler/steps × guidance
# → accuracy of the intended class, FID-CNN (and its floor at equal N), sampling images/s.
#
#   bench/quality_table.sh [--presets "mnist-dits dit-s4"] [--minutes "5 10 15"]
#                          [--samplers "euler:20:1.5|ddpm:20:1.5|euler:20:2:--cfg-interval 0,inf"]
#                          [--per-class 200] [--out runs/quality] [--train-flags "..."]
#                          [--threads 2] [--data DIR]
#
# Each sampler is NAME:STEPS:CFG[:MORE SAMPLE FLAGS], separated by "|".
# Each run trains with `--minutes M` (the step count fixed from the run's own first steps on this
# machine); the table reports the steps and the wall time each run really took, and the judge's
# accuracy (overall, lowest class), FID-CNN with its floor at the same N and their ratio, and the
# share of near-copies of training images (real test images: 5%).
# Runs and scores already in --out are reused: the script can be stopped and restarted, or
# rerun with other samplers on the same models.
set -euo pipefail
cd "$(dirname "$0")/.."

presets="mnist-dits dit-s4" minutes="5 10 15" samplers="euler:20:1.5|ddpm:20:1.5"
per_class=200 out=runs/quality train_flags="" threads=2 data=""
while [ $# -gt 0 ]; do
  case "$1" in
    --presets) presets=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --samplers) samplers=$2; shift 2 ;;
    --per-class) per_class=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --train-flags) train_flags=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q
dits=./target/release/dits
# The data set trained on is the one judged (its own classifier, cached per data checksum).
data_flag=()
if [ -n "$data" ]; then data_flag=(--data "$data"); fi
mkdir -p "$out/samples"
table="$out/table.md"
cpu="cores=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\""
echo "$cpu" | tee "$out/machine.txt" >&2
if [ ! -f "$table" ]; then
  echo "| preset | budget (min) | steps | trained (min) | sampler | steps | cfg | accuracy | lowest class | FID-CNN | floor | ×floor | near-copies | images/s |" > "$table"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" >> "$table"
fi

for preset in $presets; do
  for m in $minutes; do
    run="$out/$preset-${m}m"
    if [ ! -d "$run/checkpoints" ]; then
      echo "training $run (--minutes $m)" >&2
      rm -rf "$run"
      t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      $dits train --model "$preset" --out "$run" --minutes "$m" --no-progress --threads "$threads" "${data_flag[@]}" $train_flags \
        > "$run.log" 2>&1
      python3 -c "print(round(($(date +%s.%N) - $t0) / 60, 1))" > "$run.minutes"
    fi
    trained=$(cat "$run.minutes")
    steps=$(python3 -c "import json; print(json.load(open('$run/checkpoints/' + open('$run/checkpoints/latest').read().strip() + '/state.json'))['step'])")
    IFS='|' read -ra specs <<< "$samplers"
    for spec in "${specs[@]}"; do
      IFS=':' read -r sampler k cfg extra <<< "$spec"
      tag=$(echo "$sampler-$k-cfg$cfg$extra" | tr -c 'a-zA-Z0-9.-' '_')
      samples="$out/samples/$preset-${m}m-$tag"
      if [ ! -f "$samples.row" ]; then
        rm -rf "$samples"
        # shellcheck disable=SC2086
        line=$($dits sample --checkpoint "$run" --out "$samples" --per-class "$per_class" --sampler "$sampler" \
          --steps "$k" --cfg-scale "$cfg" --no-progress --threads "$threads" $extra)
        rate=$(echo "$line" | sed -E 's/.*\(([0-9.]+) images\/s\).*/\1/')
        $dits eval "$samples" --json --no-progress --threads "$threads" "${data_flag[@]}" > "$samples.json"
        python3 - "$samples.json" "| $preset | $m | $steps | $trained | $sampler $extra | $k | $cfg" "$rate" \
          > "$samples.row" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]} | {r['accuracy']:.3f} | {r['min_class_accuracy']:.3f} | {r['fid']:.2f} | {r['fid_floor']:.2f} | "
      f"{r['fid_ratio']:.2f} | {100 * r['memorisation']['share']:.1f}% | {sys.argv[3]} |")
PY
        cat "$samples.row" >> "$table"
      fi
      cat "$samples.row"
    done
  done
done
echo "table: $table" >&2
