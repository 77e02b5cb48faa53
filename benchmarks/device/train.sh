#!/usr/bin/env bash
# device call 2 (warm machine from call 1, setup.sh): Met ivory trainings in parallel on one H200 (session 9:
# the 1.2.0 recipe and configs/met_ivory.yaml, 12 and 20 epochs, seeds 42 and 7, then 1 and 3 with
# RUNS=...); weights come back in fp16 (8 files of <= 16 MiB) for local evaluation (restore.py). Data: the
# pools packed by benchmarks/pack_data.py into .gpu3/data (carried), Met ivory copied by setup.sh. EXTRA: more
# met_ivory.py flags for every run (arm V: EXTRA="--set train.consistency.weight=3").
set -u
[ -d /tmp/site ] && [ -d /tmp/wc/met ] || { echo "COLD: call 1 state missing"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
M=${MET:-/tmp/wc/met}; P=.gpu3/data
POOLS="--pool generic-products --pool caltech101-negatives --pool art-clean --pool listings-clean"
mkdir -p runs logs
for c in configs/met_ivory.yaml benchmarks/met_ivory_2026-11-1.2.0.yaml; do
  sed "s/^data:/data:\n  num_workers: ${WORKERS:-2}/" $c > /tmp/$(basename $c .yaml).yaml; done
run() {  # name config seed epochs
  timeout ${BUDGET:-480} python3 benchmarks/met_ivory.py --config /tmp/$2.yaml --seed $3 --epochs $4 --met $M --shared $P \
    $POOLS --eval-pool none ${EXTRA:-} --out runs/$1 > logs/$1.log 2>&1
  echo "$1 exit $? at $SECONDS s"
}
pids=()
for r in ${RUNS:-C12a:met_ivory_2026-11-1.2.0:42:12 C12b:met_ivory_2026-11-1.2.0:7:12 N12a:met_ivory:42:12 N12b:met_ivory:7:12 N20a:met_ivory:42:20 N20b:met_ivory:7:20 C20a:met_ivory_2026-11-1.2.0:42:20 C20b:met_ivory_2026-11-1.2.0:7:20}; do
  IFS=: read name cfg seed ep <<< "$r"; run $name $cfg $seed $ep & pids+=($!)
done
( while sleep 45; do echo "--- $SECONDS s $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)";
  for f in logs/*.log; do echo "$f: $(tr '\r' '\n' < $f | grep -E '^epoch|Error|error' | tail -1 | cut -c1-140)"; done; done ) &
mon=$!
wait "${pids[@]}"; kill $mon
for f in logs/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "^\| Met val|best epoch|Error" | head -6; done
python3 benchmarks/device/pack.py runs $OUT; ls -la $OUT; echo "DONE at $SECONDS s"
