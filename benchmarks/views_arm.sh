#!/bin/bash
# Arm V (issue 17): paired condition views (train.consistency.weight=3) from the start, the 1.5.0 recipe otherwise:
# 20 epochs at 256 px (Va seed 42, Vb seed 7), then 3 epochs at 320 px with the views (Wa, Wb), a grey head each
# (Ga, Gb), the pair averaged (E) and exported. One step at a time on two threads; each step skipped when done and
# a training resumed from its last.pt, so `benchmarks/views_arm.sh [OUT]` continues wherever a session stopped.
cd "$(dirname "$0")/.."
OUT=${1:-runs/V20}
mkdir -p "$OUT"
PY=.venv/bin/python
VIEWS="--set train.consistency.weight=3 --set train.threads=2"
FINETUNE="--set train.epochs=3 --set train.lr=0.0002 --set train.warmup_epochs=0.2 --set data.img_size=320"
train() {  # seed, out, extra args...
  local seed=$1 out=$2; shift 2
  local resume=""
  [ -f $OUT/$out/last.pt ] && resume="--resume"
  [ -f $OUT/$out/benchmark.json ] && return 0
  echo "$(date -u +%FT%T) train $out" >> $OUT/chain.log
  $PY benchmarks/met_ivory.py --config configs/met_ivory.yaml $VIEWS --seed $seed --out $OUT/$out $resume "$@" \
    >> $OUT/$out.log 2>&1 < /dev/null || exit 1
}
grey() {  # run, out
  [ -f $OUT/$2/calibration.json ] && return 0
  echo "$(date -u +%FT%T) grey-head $2" >> $OUT/chain.log
  .venv/bin/wildcheck grey-head $OUT/$1 --out $OUT/$2 >> $OUT/$2.log 2>&1 < /dev/null || exit 1
}
# One seed finished first (Va -> Wa -> Ga), so a member can be screened against 1.5.0's before the second seed runs.
train 42 Va
train 42 Wa $FINETUNE --init-from $OUT/Va
grey Wa Ga
train 7 Vb
train 7 Wb $FINETUNE --init-from $OUT/Vb
grey Wb Gb
if [ ! -f $OUT/model.onnx ]; then
  echo "$(date -u +%FT%T) ensemble + export" >> $OUT/chain.log
  .venv/bin/wildcheck ensemble $OUT/Ga $OUT/Gb --out $OUT/E >> $OUT/E.log 2>&1 &&
  .venv/bin/wildcheck export $OUT/E --out $OUT/model.onnx --name wildcheck-ivory --version 1.6.0-rc \
    >> $OUT/E.log 2>&1 || exit 1
fi
echo "$(date -u +%FT%T) done" >> $OUT/chain.log
