#!/usr/bin/env bash
# A before/after measurement in one device call: the same command in the code of an earlier commit (A: the folder
# $A, default .ab/A, carried) and in the working tree (B: or the folder $B), alternating A B A B ... so that drift
# on the machine (clocks, other load) falls on both sides. All runs of one NAME go to $OUT/ab_NAME.log, each under
# a header; its last lines say how long each run took and its exit status.
#
#   mkdir -p .ab && git archive --prefix=A/ REV -- '*.py' | tar -x -C .ab     # here: A's code (REV/ for others)
#   bash results/ab.sh NAME ROUNDS CMD...                                    # there, carry [".ab"]
#   A=.ab/REV1 B=.ab/REV2 bash results/ab.sh NAME ROUNDS CMD...              # two earlier commits
#
#   bash results/ab.sh train 2 python3 bench.py --suite=train --train_lengths=512,2048 --only=blalm,softmax
#   bash results/ab.sh decode 2 python3 -m results.decode.profile_decode --context=256 --batch=1
set -u
if [ $# -lt 3 ] || ! [ "$2" -ge 1 ] 2>/dev/null; then
  echo "usage: bash results/ab.sh NAME ROUNDS CMD... (ROUNDS >= 1; got: $*)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)
A_DIR=$ROOT/${A:-.ab/A} B_DIR=$ROOT/${B:-.}
for d in "$A_DIR" "$B_DIR"; do
  if [ ! -f "$d/blalm.py" ]; then
    echo "results/ab.sh: ${d#"$ROOT"/}/blalm.py is missing: make the folder with git archive (see the top of this file)" >&2
    exit 2
  fi
done
name=$1 rounds=$2
shift 2
OUT=${OUT:-results/ab_out}
mkdir -p "$OUT"
log="$OUT/ab_$name.log"
summary=()
for round in $(seq "$rounds"); do
  for side in A B; do
    dir=$B_DIR
    [ $side = A ] && dir=$A_DIR
    echo "==== $name: $side, round $round (${dir#"$ROOT"/}): $*" >> "$log"
    start=$(date +%s)
    (cd "$dir" && "$@") >> "$log" 2>&1
    rc=$?
    summary+=("$side round $round: exit $rc after $(( $(date +%s) - start )) s")
  done
done
printf '%s\n' "==== $name: done" "${summary[@]}" | tee -a "$log"
