#!/usr/bin/env bash
# Pilot of the ablation study (issue 9): 12 x 384, context 512, batch 64 x 512 tokens, 900 iters (~2 epochs).
D=.bins/strict_small
COMMON="--data=$D --block_size=512 --n_layer=12 --n_head=6 --n_embd=384 --batch_size=64 --max_iters=900
 --max_epochs=10 --eval_interval=150 --eval_iters=20 --log_interval=50 --warmup_iters=50 --compile=True
 --eval_pairs=none --milestones=False --swa_window=128 --seed=1337"
mkdir -p runs
run() {
  name=$1; shift
  echo "== $name $(date +%T)"
  python train.py $COMMON --out_dir=runs/$name "$@" > runs/$name.train.log 2>&1 || echo "train $name failed"
  grep -E "^eval|^done|model:" runs/$name.train.log | tail -4
  python eval.py --ckpt=runs/$name/ckpt.pt --zorro=.evaldata/zorro --blimp=.evaldata/blimp_dev --max_pairs=300 \
    --json=runs/$name.eval.json > runs/$name.eval.log 2>&1 || echo "eval $name failed"
  grep -E "average" runs/$name.eval.log
}
convert() {
  name=$1; shift
  echo "== $name $(date +%T)"
  python hedgehog.py --init_from=runs/softmax_adamw/ckpt.pt --data=$D --out_dir=runs/$name "$@" > runs/$name.log 2>&1 \
    || echo "convert $name failed"
  tail -25 runs/$name/report.md 2>/dev/null
}
for step in "$@"; do
  case $step in
    softmax_adamw) run softmax_adamw --mixer=attn --bias=True --optimizer=adamw --adam_lr=1e-3 ;;
    softmax_muon)  run softmax_muon --mixer=attn --bias=True --optimizer=muon ;;
    mlstm_muon)    run mlstm_muon --short_conv=0 --swa_window=0 ;;
    mlstm_conv_muon) run mlstm_conv_muon --swa_window=0 ;;
    blalm_muon)    run blalm_muon ;;
    blalm_hedgehog_muon) run blalm_hedgehog_muon --feature_map=hedgehog ;;
    blalm_adamw)   run blalm_adamw --optimizer=adamw --adam_lr=1e-3 ;;
    convert_hedgehog) convert convert_hedgehog --feature_map=hedgehog --stage1_iters=300 --stage2_iters=300 --batch_size=16 ;;
    convert_elu) convert convert_elu --feature_map=elu_learned --stage1_iters=300 --stage2_iters=300 --batch_size=16 ;;
  esac
done
