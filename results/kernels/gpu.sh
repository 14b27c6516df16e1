#!/usr/bin/env bash
# Issue 18, one device call of about 6 minutes on one GPU, in order of what the issue's targets need first:
#   1. the CUDA tests: the Triton kernels (mlstm_triton.py, conv_triton.py, the fused convolution in a training layer),
#      graph decoding, a compiled run's resume with dropout
#   2. numerics: the fused chunkwise kernel and the PyTorch form in bfloat16 against float64 (numerics.py)
#   3. with SWEEP=1: the fused kernel's profile and launch-shape sweep at T=2048 and 32768 (sweep.py)
#   4. the kernels suite: this project's chunkwise mLSTM (compiled; PyTorch and the fused Triton kernels) against
#      SDPA and NX-AI's TFLA kernel (mlstm_kernels, in a process of its own); the short convolution
#   5. the training step at T=512 and 2048: BLaLM (PyTorch), BLaLM with the Triton kernels, the softmax baseline
#   6. the training step's profile, kernel by kernel (profile_step.py)
#   7. flash-linear-attention's chunk_simple_gla beside SDPA, only when FLA=1 (it autotunes ~100 kernel
#      configurations on its first call: more than the 100 s it got in the last call)
# The peers' wheels come from .whl/ (pure Python; the image has torch, triton and einops). Every part runs under
# a time limit cut from one budget, so a failure or a hang costs only its own part.
#
#   bash results/kernels/gpu.sh          (device run, carry [".whl"]; BUDGET=seconds, default 540;
#                                         TRAIN_LENGTHS=512,2048 TRAIN_ONLY='*' for the whole train suite)
#
# $OUT gets summary.txt (versions, each part's command, exit status and seconds), and NAME.log (+ NAME.json) for
# NAME = tests, numerics, kernels, train, profile (, sweep2k, sweep32k, fla): 8 files without the optional parts.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-results/kernels/out}
mkdir -p "$OUT"
PY=${PY:-python3}
START=$(date +%s)
BUDGET=${BUDGET:-540}
SUMMARY="$OUT/summary.txt"

left() { echo $(( START + BUDGET - $(date +%s) )); }

# part NAME CAP MIN CMD...: CMD under a limit of min(CAP, what is left of the budget) seconds, not run at all when
# less than MIN seconds are left; its output in $OUT/NAME.log
part() {
  local name=$1 cap=$2 min=$3 t s rc
  shift 3
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt "$min" ]; then
    echo "== $name: not run, ${t} s of the budget left (it needs ${min})" | tee -a "$SUMMARY"
    return
  fi
  echo "== $name (limit ${t} s): $*" | tee -a "$SUMMARY"
  s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - s )) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
}

{
  date -u
  git log -1 --format='commit %H %s' 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
                                          'triton', triton.__version__)"
} >> "$SUMMARY" 2>&1

if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$SUMMARY" 2>&1; then
  export PYTHONPATH=/tmp/site
  $PY -c "import importlib.metadata as m; print('peers:', *(p + ' ' + m.version(p) for p in ('mlstm_kernels', 'fla-core')))" \
    >> "$SUMMARY" 2>&1
else
  echo "the peers' wheels did not install: their rows will say 'not installed'" >> "$SUMMARY"
fi

# 1. the kernel tests and the other CUDA tests (graph decoding, a compiled run's resume with dropout); the one that
#    reruns the kernel tests under the Triton interpreter is CPU work, done wherever the suite runs
part tests 160 20 $PY -m pytest -q -rs -p no:cacheprovider -k "(triton and not interpreter) or cuda" test_all.py

# 2. numerics (about 20 s)
part numerics 60 15 $PY -m results.kernels.numerics

# 3. where the fused kernel's time goes, and its launch shapes (half a minute each), when SWEEP=1
if [ "${SWEEP:-0}" = 1 ]; then
  part sweep2k 100 30 $PY -m results.kernels.sweep --T=2048
  part sweep32k 60 20 $PY -m results.kernels.sweep --T=32768 --repeat=5
fi

# 4. SDPA, ours compiled, NX-AI's TFLA, the short convolution (about two minutes: every length compiled afresh)
part kernels 200 30 $PY bench.py --suite=kernels --json="$OUT/kernels.json" --peer_timeout=100 \
  --only="sdpa causal,mlstm chunkwise compiled,mlstm chunkwise triton compiled,nx-ai*,short conv*"

# 5. the training step, BLaLM and softmax, each compiled afresh (about a minute a length)
part train 200 70 $PY bench.py --suite=train --train_lengths="${TRAIN_LENGTHS:-512,2048}" \
  --only="${TRAIN_ONLY:-blalm,blalm triton,softmax}" --json="$OUT/train.json"

# 6. the training step's GPU time by kernel, BLaLM with the Triton kernels and softmax (about 40 s)
part profile 90 30 $PY -m results.kernels.profile_step --T=512

# 7. fla's chunk_simple_gla beside SDPA, with the rest of the budget, when asked for
if [ "${FLA:-0}" = 1 ]; then
  T_FLA=$(( $(left) - 25 ))
  part fla 600 40 $PY bench.py --suite=kernels --json="$OUT/fla.json" --peer_timeout="$(( T_FLA > 20 ? T_FLA : 20 ))" \
    --only="sdpa causal,fla*"
fi

echo "== done after $(( $(date +%s) - START )) s" | tee -a "$SUMMARY"
ls -la "$OUT"
