#!/usr/bin/env bash
# Regenerates the README's CPU-side numbers on the machine it runs on (the README's were taken on a 2-core CPU):
# the default run on the synthetic corpus and the CPU recipe on real text (ChiLit children's books), each in a
# fresh folder under runs/cpu/, then the CPU recipe's zero-shot scores. Usage, from the repository root:
#
#   bash results/cpu/measure.sh CORPUS_ROOT EVAL_ROOT   # e.g. the corpus folder and a BabyLM evaluation_data/full_eval
#
# CORPUS_ROOT holds chilit_gutenberg/ (or point it at any folder of .txt files); EVAL_ROOT holds blimp_filtered/
# and supplement_filtered/. Zorro is read from ZORRO=DIR when given.
set -eu
CORPUS=${1:?usage: measure.sh CORPUS_ROOT EVAL_ROOT}
EVAL=${2:?usage: measure.sh CORPUS_ROOT EVAL_ROOT}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=$REPO/runs/cpu/$(date +%Y%m%d-%H%M%S)
mkdir -p "$W" && cd "$W"
/usr/bin/time -f "wall %e s, peak %M kB" python "$REPO/train.py" > default.log 2>&1
grep -E "^eval|^done|^wall" default.log
/usr/bin/time -f "wall %e s, peak %M kB" python "$REPO/train.py" --preset=cpu --data="$CORPUS/chilit_gutenberg" \
  --out_dir=cpu > cpu.log 2>&1
grep -E "^wrote data|^eval|^done|^wall" cpu.log
python "$REPO/eval.py" --ckpt=cpu --babylm="$EVAL" --tasks=blimp_filtered,supplement_filtered --json=cpu_babylm.json \
  2>/dev/null | grep -E "^(blimp|supplement)|macro"
if [ -n "${ZORRO:-}" ]; then
  python "$REPO/eval.py" --ckpt=cpu --zorro="$ZORRO" --json=cpu_zorro.json 2>/dev/null | grep -E "average"
fi
