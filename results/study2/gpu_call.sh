#!/usr/bin/env bash
# One device call: the GPU smoke run of train.py (issue 14) beside the study runs named on the command line;
# logs and evaluation JSONs are packed into $OUT/study.tgz (the checkpoints stay on the machine).
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__)" >> "$OUT/gpu.txt" 2>&1
mkdir -p runs
if [ "${SMOKE:-1}" = 1 ]; then
  ( $PY train.py --preset=strict_small --data=.bins/strict_small --max_iters=40 --eval_interval=20 \
      --log_interval=10 --eval_pairs=none --out_dir=runs/smoke --overwrite=True > "$OUT/train_smoke_h200.log" 2>&1 ) &
fi
timeout "${BUDGET:-500}" bash results/study2/study.sh "$@" 2>&1 | tee "$OUT/study.log"
# at the time limit `timeout` sends SIGTERM to the whole group: each train.py finishes its step and writes
# ckpt.pt (the next call resumes from there); give them a minute to do so
for _ in $(seq 60); do pgrep -f "train.py" > /dev/null 2>&1 || break; sleep 1; done
wait
tar czf "$OUT/study.tgz" runs/study2/*.log runs/study2/*.json runs/study2/*.png runs/study2/*/log.jsonl 2>/dev/null
ls -la "$OUT"
