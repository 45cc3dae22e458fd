#!/usr/bin/env bash
# One short GPU session: correctness of the device paths, then timings. Run from the repository root:
#   bash benchmarks/gpu_check.sh            (results in benchmarks/results/*_cuda.json and $OUT if set)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. the tests that exercise device code, on CUDA where they pick it up
$PY -m pytest -q tests/test_consistency.py tests/test_losses.py tests/test_networks.py 2>&1 | tail -3
# 2. the training loop on the GPU, fp32 and bf16, a few iterations of each stage
for prec in fp32 bf16; do
  $PY -m ayt train --preset demo-feature-net name=gpu-feat-$prec run_root=/tmp/gpu iters=20 precision=$prec device=cuda
  $PY -m ayt train --preset demo-diffusion name=gpu-diff-$prec run_root=/tmp/gpu iters=20 precision=$prec device=cuda
  $PY -m ayt train --preset demo-ayt name=gpu-ayt-$prec run_root=/tmp/gpu iters=20 precision=$prec device=cuda \
      net.init=/tmp/gpu/gpu-diff-$prec ct.feature_net=/tmp/gpu/gpu-feat-$prec
done
# 3. timings: ECT vs AYT step at paper scale (CIFAR-10 DDPM++, VGG16) and mini scale
$PY benchmarks/step_time.py --preset cifar10-ayt --batch 128 --device cuda --out "$OUT/step_time_cifar10-ayt_cuda.json"
$PY benchmarks/step_time.py --preset cifar10-ayt --batch 128 --device cuda --precision bf16 --out "$OUT/step_time_cifar10-ayt_cuda_bf16.json"
$PY benchmarks/step_time.py --preset mini-ayt --batch 16 --device cuda --out "$OUT/step_time_mini-ayt_cuda.json"
$PY benchmarks/fid_throughput.py --device cuda --n 10000 --out "$OUT/fid_throughput_cuda.json"
