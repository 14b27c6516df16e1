#!/usr/bin/env bash
# The ablation study (issue 9): 12 layers x 448 wide (7 heads of 64, ~30M non-embedding parameters),
# context 512, batches of 64 x 512 tokens, on the STRICT-SMALL-sized bins in .bins/strict_small and the
# evaluation folders in .evaldata/. Runs are spread over the visible GPUs, one run per GPU at a time.
#
#   bash results/study/study.sh sweep                 # each run's learning-rate sweep: 300 iters (~0.67 epoch)
#   bash results/study/study.sh full NAME=LR ...      # the full protocol: the 10-epoch cap (4,462 iters)
#
# Runs write into runs/ (git-ignored); a full run that was cut off continues from its checkpoint when
# started again. GPUS="0 1" picks the GPUs (default: all that nvidia-smi lists).
set -u
D=.bins/strict_small
COMMON="--data=$D --block_size=512 --n_layer=12 --n_head=7 --n_embd=448 --batch_size=64 --swa_window=128
 --compile=True --eval_pairs=none --milestones=False --seed=1337 --log_interval=50 --eval_iters=20"
SWEEP="--max_iters=300 --warmup_iters=15 --eval_interval=100"
FULL="--max_iters=0 --max_epochs=10 --warmup_iters=200 --eval_interval=250"

# the seven runs: what they change from the default BLaLM, and which learning rate the sweep varies
flags() {
  case $1 in
    softmax_adamw)       echo "--mixer=attn --bias=True --optimizer=adamw --adam_lr=$2" ;;
    softmax_muon)        echo "--mixer=attn --bias=True --optimizer=muon --learning_rate=$2" ;;
    mlstm_muon)          echo "--short_conv=0 --swa_window=0 --learning_rate=$2" ;;
    mlstm_conv_muon)     echo "--swa_window=0 --learning_rate=$2" ;;
    blalm_muon)          echo "--learning_rate=$2" ;;
    blalm_hedgehog_muon) echo "--feature_map=hedgehog --learning_rate=$2" ;;
    blalm_adamw)         echo "--optimizer=adamw --adam_lr=$2" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}
MUON_LRS="0.01 0.02 0.04"
ADAMW_LRS="1e-3 2e-3 4e-3 8e-3"

train() {  # train NAME OUT_DIR FLAGS...
  local name=$1 out=$2; shift 2
  local resume=False
  [ -f "$out/ckpt.pt" ] && resume=True
  echo "== $(date +%T) gpu $CUDA_VISIBLE_DEVICES: $out"
  python train.py $COMMON --out_dir="$out" --resume=$resume "$@" >> "$out.train.log" 2>&1 || echo "train $out failed"
  grep -E "^eval|^done|^stopped|model:" "$out.train.log" | tail -2
}

evaluate() {  # the checkpoint at the end of the run, and the one of the lowest validation loss
  for c in "" _best; do
    python eval.py --ckpt="$1/ckpt$c.pt" --zorro=.evaldata/zorro --blimp=.evaldata/blimp_dev --batch_size=256 \
      --json="$1$c.eval.json" > "$1$c.eval.log" 2>&1 || echo "eval $1$c failed"
    echo "$1$c: $(grep -E "average" "$1$c.eval.log" | tr '\n' ' ')"
  done
}

job() {  # one line of the job list: "sweep NAME LR" or "full NAME LR"
  local kind=$1 name=$2 lr=$3
  if [ "$kind" = sweep ]; then
    mkdir -p runs/sweep
    train "$name" "runs/sweep/${name}_lr$lr" $SWEEP $(flags "$name" "$lr")
  else
    mkdir -p runs/full
    train "$name" "runs/full/$name" $FULL $(flags "$name" "$lr") && evaluate "runs/full/$name"
  fi
}

# a queue of GPUs: each job takes one, runs, and hands it back
run_queue() {
  local gpus=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')}
  local fifo; fifo=$(mktemp -u); mkfifo "$fifo"; exec 3<>"$fifo"; rm "$fifo"
  for g in $gpus; do echo "$g" >&3; done
  while read -r line; do
    read -r -u 3 g
    ( CUDA_VISIBLE_DEVICES=$g job $line < /dev/null; echo "$g" >&3 ) &
  done
  wait
}

phase=${1:-}; shift || true
case $phase in
  sweep)  # longest first, so that the short softmax runs fill the gaps at the end
    { for n in blalm_hedgehog_muon blalm_muon mlstm_conv_muon mlstm_muon; do
        for lr in $MUON_LRS; do echo "sweep $n $lr"; done; done
      for lr in $ADAMW_LRS; do echo "sweep blalm_adamw $lr"; done
      for lr in $MUON_LRS; do echo "sweep softmax_muon $lr"; done
      for lr in $ADAMW_LRS; do echo "sweep softmax_adamw $lr"; done; } | run_queue ;;
  full)
    for a in "$@"; do echo "full ${a%%=*} ${a#*=}"; done | run_queue ;;
  *) echo "usage: $0 sweep | full NAME=LR ..." >&2; exit 2 ;;
esac
