#!/usr/bin/env bash
# Issue 19 (fast generation) on one GPU, about 5 minutes (8 at most, the parts' limits): the CUDA decode tests,
# bench.py --suite=decode, the batch-1 step's profile (profile_decode.py, issue 28), sample.py end to end on a
# freshly made checkpoint of the strict_small shape (two training steps on the built-in synthetic corpus: its
# tokens/s, not its text, is the point), then the decode suite again with the blocks compiled for decoding. Every
# part has its own time limit and log, and a failing part does not stop the next one.
#
#     bash results/decode/gpu.sh          # logs go to $OUT (default results/decode/out): 8 files at most
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-results/decode/out}
PY=${PY:-python3}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)   # the checkpoint and prepared corpus: not results

part() {  # part NAME SECONDS COMMAND... -> $OUT/NAME.log, and one summary line on stdout
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 3 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
git log -1 --oneline; git status --short
part tests 75 $PY -m pytest -q -s -p no:cacheprovider test_all.py -k "cuda_graph or decode or generate or sample_next"
part bench 130 $PY bench.py --suite=decode --json="$OUT/decode.json"
# where a batch-1 step's time goes, BLaLM and softmax, compiled and graphed (issue 28's decode target)
part profile 90 $PY -m results.decode.profile_decode --context=256 --batch=1
part train_tiny 50 $PY train.py --out_dir="$SCRATCH/tiny" --prepared_dir="$SCRATCH/data" --max_iters=2 \
    --eval_interval=2 --eval_iters=1 --eval_pairs=none --milestones=False --keep_best=False --log_interval=1 \
    --batch_size=4 --n_layer=12 --n_head=7 --n_embd=448 --block_size=512 --swa_window=128
printf 'Once upon a time\nThe cat sat on the\n\nShe said that the little dog was very happy because\n' \
    > "$SCRATCH/prompts.txt"   # 4 prompts of different lengths (one empty: end-of-text), 16 samples each
# batch 1, then batch 64, into one log (the call brings back 8 files at most)
part sample 50 bash -c "$PY sample.py --ckpt='$SCRATCH/tiny/ckpt.pt' --start='Once upon a time' --num_samples=1 \
    --max_new_tokens=256 && $PY sample.py --ckpt='$SCRATCH/tiny/ckpt.pt' --start=LINES:'$SCRATCH/prompts.txt' \
    --num_samples=16 --max_new_tokens=256"
grep -h "tokens/s" "$OUT"/sample.log
rm -rf "$SCRATCH"
# last, as it may not fit: the decode blocks compiled by inductor (model.compile_decode), BLaLM only (COMPILE=0 skips)
if [ "${COMPILE:-1}" = 1 ]; then
    part bench_compiled 90 $PY bench.py --suite=decode --decode_modes=compiled,generate_compiled --only=blalm \
        --json="$OUT/decode_compiled.json"
fi
