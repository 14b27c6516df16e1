#!/usr/bin/env bash
# Sample-efficiency study, round two (issue 20), on ONE GPU: several runs at a time on the same card, each
# trained on the STRICT-SMALL bins in .bins/strict_small and evaluated on the BabyLM 2025 suite and Zorro
# in .evaldata/ (both git-ignored, carried to the GPU machine).
#
#   bash results/study2/study.sh NAME [NAME ...]     # the runs of queue.txt with these names
#   JOBS=3 bash results/study2/study.sh ...          # how many run on the GPU at once (default 3)
#   EXTRA="--eval_interval=100" bash ...             # flags added to every run (here: checkpoints more often)
#
# queue.txt holds one run per line: NAME FLAGS... (flags on top of the strict_small preset). Each run writes
# runs/study2/NAME/ (git-ignored), NAME.train.log, NAME.eval.json/.log (final checkpoint) and
# NAME_best.eval.json/.log (lowest validation loss), and for a run with --milestones=True NAME.curve.json/.png
# (BLiMP filtered and the supplement at every milestone, at most CURVE_ITEMS items per UID); a run cut off continues from its checkpoint when started
# again, and an evaluated run is not repeated.
set -u
cd "$(dirname "$0")/../.."
D=${DATA:-.bins/strict_small}
E=${EVAL:-.evaldata}
OUT_ROOT=runs/study2
PY=${PY:-python3}
COMMON="--preset=strict_small --data=$D --eval_pairs=none --milestones=False --log_interval=50 --eval_iters=20
 --eval_interval=250"
mkdir -p "$OUT_ROOT"

flags_of() { awk -v n="$1" '!/^#/ && $1 == n { $1 = ""; print; found = 1 } END { if (!found) exit 1 }' results/study2/queue.txt; }

evaluate() {  # evaluate RUN_DIR CKPT SUFFIX
  local run=$1 ck=$2 tag=$3
  [ -f "$run$tag.eval.json" ] && return
  $PY eval.py --ckpt="$run/$ck" --babylm="$E/babylm_eval" --batch_size=256 --json="$run$tag.eval.json" \
    > "$run$tag.eval.log" 2>&1 || echo "eval $run$tag failed"
  $PY eval.py --ckpt="$run/$ck" --zorro="$E/zorro" --batch_size=256 --json="$run$tag.zorro.json" \
    > "$run$tag.zorro.log" 2>&1 || echo "zorro $run$tag failed"
  echo "$(date +%T) $run$tag: $(grep -h macro-average "$run$tag.eval.log" "$run$tag.zorro.log" | tr '\n' ' ')"
}

job() {
  local name=$1 out=$OUT_ROOT/$1 flags
  flags=$(flags_of "$name") || { echo "no run $name in queue.txt"; return; }
  local resume=False
  [ -f "$out/ckpt.pt" ] && resume=True
  if ! grep -q "^done" "$out.train.log" 2>/dev/null; then
    echo "$(date +%T) start $name: $flags"
    $PY train.py $COMMON $flags ${EXTRA:-} --out_dir="$out" --resume=$resume >> "$out.train.log" 2>&1 || echo "train $name failed"
    grep -E "^done|^stopped|^error" "$out.train.log" | tail -1
  fi
  evaluate "$out" ckpt.pt ""
  # the lowest-validation checkpoint too, when it is not the final one
  if awk '/^eval iter/ { v = $6 + 0; if (!n++ || v < best) best = v; last = v } END { exit !(last > best) }' \
      "$out.train.log"; then
    evaluate "$out" ckpt_best.pt _best
  fi
  if [[ " $flags " == *" --milestones=True "* ]] && [ ! -f "$out.curve.json" ]; then
    $PY eval.py --run="$out" --babylm="$E/babylm_eval" --tasks=blimp_filtered,supplement_filtered \
      --max_pairs="${CURVE_ITEMS:-400}" --batch_size=256 --json="$out.curve.json" --plot_out="$out.curve.png" \
      > "$out.curve.log" 2>&1 || echo "curve $name failed"
    echo "$(date +%T) $name curve: $(tail -1 "$out.curve.log")"
  fi
}

n=0
for name in "$@"; do
  job "$name" &
  n=$((n + 1))
  if [ $((n % ${JOBS:-3})) -eq 0 ]; then wait; fi
done
wait
