#!/usr/bin/env bash
# One device call of the study: unpack the evaluation files, prepare the bins of bins.txt that a run needs (from
# the corpus copy in .corpus/), run study.sh under a time limit, and pack the logs and evaluation JSONs into
# $OUT/study3.tgz. Every run's checkpoints stay on the (warm) machine, so the next call continues where this stopped.
#
#   BUDGET=500 bash results/study3/gpu_call.sh NAME [NAME ...]   # JOBS: one run per 18 GB of the card unless given
#   CURVE=base BUDGET=500 bash ...   # also score BLiMP + supplement at each milestone of a finished run (the plot)
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__)"; } \
  > "$OUT/gpu.txt" 2>&1
[ -d .evaldata/babylm_eval ] || tar xzf .evaldata/babylm_eval.tgz -C .evaldata
# bins of bins.txt that a queued run names and the machine lacks: prepared in the background (study.sh's job waits
# for their meta.json)
for name in $(for n in "$@"; do grep "^$n " results/study3/queue.txt; done | grep -o -- "--data=.bins/[^ ]*" \
              | cut -d/ -f2 | sort -u); do
  flags=$(awk -v n="$name" '!/^#/ && $1 == n { sub(/#.*/, ""); $1 = ""; print }' results/study3/bins.txt)
  [ -n "$flags" ] && [ ! -f ".bins/$name/meta.json" ] || continue
  $PY prepare.py --source=.corpus --budget_words=10000000 $flags --out=".bins/$name" > "$OUT/prepare_$name.log" 2>&1 &
done
# a compiled BLaLM run holds 13-21 GB, 24 GB with --feature_map=hedgehog (seen on the H100: nine at once ran out
# of memory; four fitted until, in session five, a resumed one did not), so without JOBS the card's memory decides:
# one run per 21 GB. Expandable segments keep the cached-but-free blocks of one process from fragmenting.
if [ -z "${JOBS:-}" ]; then
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  export JOBS=$(( mib / 21504 > 0 ? mib / 21504 : 1 ))
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
echo "$(date +%T) JOBS=$JOBS" | tee -a "$OUT/gpu.txt"
if [ -n "${CURVE:-}" ]; then   # takes one of the JOBS slots
  export JOBS=$(( JOBS > 1 ? JOBS - 1 : 1 ))
  timeout "${BUDGET:-500}" $PY eval.py --run="runs/study3/$CURVE" --babylm=.evaldata/babylm_eval \
    --tasks=blimp_filtered,supplement_filtered --batch_size=128 --json="runs/study3/$CURVE.curve.json" \
    > "runs/study3/$CURVE.curve.log" 2>&1 &   # the JSON holds the finished milestones if the time limit stops it
fi
timeout "${BUDGET:-500}" bash results/study3/study.sh "$@" 2>&1 | tee "$OUT/study.log"
# at the time limit `timeout` sends SIGTERM to the group: each train.py finishes its step and writes ckpt.pt
for _ in $(seq 45); do pgrep -f "train.py|eval.py" > /dev/null 2>&1 || break; sleep 1; done
wait
tar czf "$OUT/study3.tgz" runs/study3/*.log runs/study3/*.json runs/study3/*/log.jsonl \
  runs/study3/*/babylm_curve.* 2>/dev/null
ls -la "$OUT"
