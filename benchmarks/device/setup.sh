#!/usr/bin/env bash
# device call 1 (session 9; carry .gpu = wheels for what the device image lacks + Met ivory packed): install the missing wheels, keep the Met data in /tmp for call 2, check imports,
# CUDA and the offline weights, smoke-train 1 epoch of the benchmark path on 40 images per class and pack it
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p /tmp/wc && cp -r .gpu/data/met-ivory /tmp/wc/met
echo "cores $(nproc)"; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch, timm, albumentations, pydantic, onnx, cv2; print(torch.__version__, timm.__version__, albumentations.__version__, pydantic.__version__, torch.cuda.is_available())" || exit 1
mkdir -p /tmp/smoke/met/{train,val}/{ivory,other}
for s in train val; do for l in ivory other; do ls /tmp/wc/met/$s/$l | head -40 | while read f; do ln -sf /tmp/wc/met/$s/$l/$f /tmp/smoke/met/$s/$l/$f; done; done; done
sed 's/^data:/data:\n  num_workers: 2/' configs/met_ivory.yaml > /tmp/smoke/cfg.yaml
T=$SECONDS
timeout 150 python3 benchmarks/met_ivory.py --config /tmp/smoke/cfg.yaml --epochs 2 --met /tmp/smoke/met --no-negatives \
  --eval-pool none --out /tmp/smoke/run > /tmp/smoke/log 2>&1; echo "smoke exit $? in $((SECONDS - T)) s"
tr '\r' '\n' < /tmp/smoke/log | grep -v -E "it/s|img/s|s/it" | tail -25
cat /tmp/smoke/run/history.csv
python3 benchmarks/device/pack.py /tmp/smoke $OUT && ls -la $OUT
echo "SETUP DONE at $SECONDS s"
