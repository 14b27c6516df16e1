#!/usr/bin/env bash
# Sample-efficiency study, round three (issue 29), on ONE GPU: the runs named on the command line share the card,
# at most JOBS at a time (the next starts as soon as one ends). Each trains on the STRICT-SMALL bins and its final
# checkpoint is scored on the BabyLM 2025 folder with eval.py --babylm.
#
#   bash results/study3/study.sh NAME [NAME ...]   # runs of queue.txt, by name
#   JOBS=4 DATA=.bins/strict_small EVAL=.evaldata/babylm_eval bash results/study3/study.sh ...
#
# Each run writes runs/study3/NAME/ (git-ignored), NAME.train.log and NAME.eval.json/.log. A run cut off (SIGTERM
# at the call's time limit: train.py writes ckpt.pt first) continues from its checkpoint when started again; a
# finished run is not trained again and an evaluated one not evaluated again.
set -u
cd "$(dirname "$0")/../.."
D=${DATA:-.bins/strict_small}
E=${EVAL:-.evaldata/babylm_eval}
ROOT=runs/study3
PY=${PY:-python3}
# the preset as the study ran it (4 epochs, no dropout, SWA window 128): queue.txt's flags are on top of this, so
# that each line keeps meaning the run it made after the preset moved to 6 epochs + dropout 0.1 (the study's
# result; its window went to 256 in session seven and back to 128 in session eight)
COMMON="--preset=strict_small --max_epochs=4 --dropout=0.0 --swa_window=128 --data=$D --eval_pairs=none"
COMMON="$COMMON --log_interval=50 --eval_iters=20 --eval_interval=100"
mkdir -p "$ROOT"

# a line's flags, without a trailing "# comment"
flags_of() { awk -v n="$1" '!/^#/ && $1 == n { sub(/#.*/, ""); $1 = ""; print; found = 1 } END { if (!found) exit 1 }' \
  results/study3/queue.txt; }

job() {
  local name=$1 out=$ROOT/$1 flags resume=False
  flags=$(flags_of "$name") || { echo "no run $name in queue.txt"; return; }
  [ -f "$out/ckpt.pt" ] && resume=True
  # bins that gpu_call.sh is still preparing in the background: wait for them (at most 3 minutes)
  local d; d=$(grep -o -- "--data=[^ ]*" <<< "$flags" | cut -d= -f2)
  for _ in $(seq 36); do [ -z "$d" ] || [ -f "$d/meta.json" ] && break; sleep 5; done
  if ! grep -q "^done" "$out.train.log" 2>/dev/null; then
    echo "$(date +%T) start $name (resume=$resume): $flags"
    # the later --data in $flags wins over COMMON's
    $PY train.py $COMMON $flags ${EXTRA:-} --out_dir="$out" --resume=$resume >> "$out.train.log" 2>&1 \
      || { local last; last=$(tail -1 "$out.train.log"); echo "$(date +%T) train $name stopped: $last"
           # out of GPU memory while the card is shared: the name goes back to the queue, run again after the rest
           grep -q OutOfMemoryError <<< "$last" && echo "$name" >> "$ROOT/.oom"; return; }
  fi
  # an evaluation cut off by the time limit writes the tasks it finished (and says "interrupted"): score it again
  if [ -f "$out.eval.json" ] && grep -q '"interrupted"' "$out.eval.json"; then
    mv "$out.eval.json" "$out.eval.cut.json"; mv "$out.eval.log" "$out.eval.cut.log"
  fi
  if [ ! -f "$out.eval.json" ]; then
    $PY eval.py --ckpt="$out/ckpt.pt" --babylm="$E" --batch_size=128 --json="$out.eval.json" > "$out.eval.log" 2>&1 \
      || { echo "$(date +%T) eval $name failed: $(tail -1 "$out.eval.log")"; return; }
  fi
  echo "$(date +%T) $name: $(grep -h '^done' "$out.train.log" | tail -1) | $(tail -1 "$out.eval.log")"
}

rm -f "$ROOT/.oom"
for name in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-4}" ]; do wait -n; done
  job "$name" &
done
wait
# the runs that stopped out of memory, once more each (from their last checkpoint), now that the card is free
if [ -f "$ROOT/.oom" ]; then
  for name in $(cat "$ROOT/.oom"); do
    echo "$(date +%T) again after running out of memory: $name"
    job "$name"
  done
  rm -f "$ROOT/.oom"
fi
