#!/usr/bin/env bash
# The quality table of the README: model preset × training minutes × sampler/steps × guidance
# → accuracy of the intended class, FID-CNN (and its floor at equal N), sampling images/s.
#
#   bench/quality_table.sh [--presets "mnist-dits dit-s4"] [--minutes "5 15 30"]
#                          [--samplers "euler:20:2|ddpm:20:1.5|euler:20:2:--cfg-interval 0,inf"]
#                          [--per-class 100] [--out runs/quality] [--train-flags "..."]
#                          [--threads 2]
#
# Each sampler is NAME:STEPS:CFG[:MORE SAMPLE FLAGS], separated by "|".
# "Minutes" are turned into a step count from the throughput `dits train` reaches on this
# machine (a 200-step calibration run per preset, timed), so a run of the table trains for
# about that long here; the table reports the steps and the wall time each run really took.
# Runs and scores already in --out are reused: the script can be stopped and restarted, or
# rerun with other samplers on the same models.
set -euo pipefail
cd "$(dirname "$0")/.."

presets="mnist-dits dit-s4" minutes="5 15 30" samplers="euler:20:2|ddpm:20:1.5"
per_class=100 out=runs/quality train_flags="" threads=2
while [ $# -gt 0 ]; do
  case "$1" in
    --presets) presets=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --samplers) samplers=$2; shift 2 ;;
    --per-class) per_class=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --train-flags) train_flags=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release -q
dits=./target/release/dits
mkdir -p "$out/samples"
table="$out/table.md"
if [ ! -f "$table" ]; then
  echo "| preset | budget (min) | steps | trained (min) | sampler | steps | cfg | accuracy | FID-CNN | floor | images/s |" > "$table"
  echo "|---|---|---|---|---|---|---|---|---|---|---|" >> "$table"
fi

for preset in $presets; do
  per_step=""
  for m in $minutes; do
    run="$out/$preset-${m}m"
    if [ ! -d "$run/checkpoints" ]; then
      if [ -z "$per_step" ]; then
        # Calibration: 200 steps of the real training loop (data, logging, checkpoint included).
        cal="$out/.calibrate-$preset"
        rm -rf "$cal"
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        $dits train --model "$preset" --out "$cal" --steps 200 --no-progress --threads "$threads" $train_flags >/dev/null
        per_step=$(python3 -c "print(($(date +%s.%N) - $t0) / 200)")
        rm -rf "$cal"
      fi
      steps=$(python3 -c "print(int($m * 60 / $per_step))")
      echo "training $run: $steps steps (~$m min)" >&2
      rm -rf "$run"
      t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      $dits train --model "$preset" --out "$run" --steps "$steps" --no-progress --threads "$threads" $train_flags \
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
        $dits eval "$samples" --json --no-progress --threads "$threads" > "$samples.json"
        python3 - "$samples.json" "| $preset | $m | $steps | $trained | $sampler $extra | $k | $cfg" "$rate" \
          > "$samples.row" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]} | {r['accuracy']:.3f} | {r['fid']:.1f} | {r['fid_floor']:.1f} | {sys.argv[3]} |")
PY
        cat "$samples.row" >> "$table"
      fi
      cat "$samples.row"
    done
  done
done
echo "table: $table" >&2
