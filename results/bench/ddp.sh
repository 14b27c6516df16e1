#!/usr/bin/env bash
# DDP check: the same per-GPU batch on 1 and on 2 GPUs; tokens/s from the log lines.
D=.bins/strict_small
A="--data=$D --block_size=512 --n_layer=6 --n_head=4 --n_embd=256 --batch_size=32 --max_iters=150 --eval_interval=1000
 --eval_iters=2 --eval_pairs=none --log_interval=50 --milestones=False --warmup_iters=10"
nvidia-smi --query-gpu=name --format=csv,noheader
python train.py $A --out_dir=ddp1 2>&1 | grep -E "^iter|^done|error" | tail -3
torchrun --standalone --nproc_per_node=2 train.py $A --out_dir=ddp2 2>&1 | grep -E "^iter|^done|rror" | tail -3
