#!/usr/bin/env bash
# The GPU half of issue 5 in as few device calls as possible: each stage's full output goes to $OUT/<stage>.log
# (or ./gpu-logs), and a stage that hangs is cut off by its own timeout instead of taking the rest with it.
#
#   bash bench/gpu.sh limit      # the CUDA tests and the yardstick (raw fwd+bwd, method efficiency)
#   bash bench/gpu.sh methods    # engine vs peers on ResNet-50 and EfficientNet-Lite0, fp32 and bf16
#   bash bench/gpu.sh service    # MoreauGrad 200 x 32 on ResNet-50, the service under load
#   bash bench/gpu.sh next       # the GPU cap test; first-time work per thread; the warmed service at 16 clients
#   bash bench/gpu.sh service2   # the service with thread and process workers, Grad-CAM and IG; the GIL probe
#   bash bench/gpu.sh autotune   # the service with cuDNN autotuning on
#   bash bench/gpu.sh moreau     # MoreauGrad 200 x 32 on ResNet-50 at batch 8: fp32, and fp16 (whole pass)
#   bash bench/gpu.sh fold       # BatchNorm folding: folded vs as built; IG/SmoothGrad vs Captum, fp32 and bf16
#   bash bench/gpu.sh profile    # the warmed server at 16 clients under py-spy: on a CPU and holding the GIL
#   bash bench/gpu.sh warm       # one short lease: padding and warm-up measured (first pass, service), D-RISE
#   bash bench/gpu.sh verify     # the detector pass budget and the fold check on a GPU; the folded service
#
# On the lent GPU machine (Python 3.12 with torch, no registry), first install the wheels that
# ../shared/gpu/fetch-wheels.sh put in .whl (it prints the line); the stages only need `python3`. Beyond its
# list this project needs (versions as in .venv):
#   bash ../shared/gpu/fetch-wheels.sh orjson==3.13.0 pybase64==1.5.1 ttach==0.0.3 opentelemetry-api==1.45.2 \
#     py-spy==0.4.3
#   .venv/bin/pip wheel -q --no-deps grad-cam==1.5.7 -w .whl     # sdist only on PyPI: build it here
# (fastapi >= 0.16x imports opentelemetry; without it the server does not start there.) Stage timeouts keep
# each set under the device's 10-minute call; the first two sets took 470 and 430 s on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$out/summary.log"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - start)) s" | tee -a "$out/summary.log"
  # The tables (markdown rows) and check lines, for the call's short reply.
  grep -E '\| [0-9]|^\||check|FAILED|passed|failed|error|Error' "$out/$name.log" | tail -40 >>"$out/summary.log"
}

engine_vs_peers() {  # engine_vs_peers r50|lite0 fp32|bf16
  local model=(--arch resnet50)
  [ "$1" = lite0 ] && model=(--model efficientnet_lite0)
  stage "methods_$1_$2" 120 $py bench/methods.py "${model[@]}" --device cuda --batch-sizes 1,8,32 \
    --ig-steps 50 --sg-samples 25 --moreau-iterations 10 --moreau-samples 32 --repeats 5 --budget 3 \
    --precision "$2"
}

moreau() {  # the issue's MoreauGrad target: 200 x 32 on ResNet-50 at batch 8, passes of 256 images
  stage "moreau_r50_$1" 150 $py bench/methods.py --arch resnet50 --device cuda --methods moreaugrad \
    --batch-sizes 8 --moreau-iterations 200 --moreau-samples 32 --repeats 1 --max-batch 256 --precision "$1"
}

case ${1:-limit} in
  limit)  # about 5 minutes on an H100
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
    stage tests 200 $py -m pytest -q -m gpu tests/test_calibrate.py tests/test_precision.py
    stage limit_lite0 120 $py bench/limit.py --device cuda --batch-sizes 1,8,32,64,128
    stage limit_r50 120 $py bench/limit.py --device cuda --arch resnet50 --batch-sizes 1,8,32,64,128,256
    stage limit_r50_bf16 120 $py bench/limit.py --device cuda --arch resnet50 --precision bf16 \
      --batch-sizes 1,8,32,64,128,256
    ;;
  methods)  # engine vs peers at the service's defaults, float32 and bf16 against the float32 peers
    for run in r50:fp32 r50:bf16 lite0:fp32; do
      engine_vs_peers "${run%:*}" "${run#*:}"
    done
    moreau fp32
    ;;
  service)
    stage service 240 $py bench/service.py --device cuda --ig-steps 50 --scale 10
    for precision in fp32 bf16; do  # rows print as measured (a time limit keeps them); no FullGrad peer:
      # pytorch-grad-cam's FullGrad takes minutes per batch on this GPU
      stage "methods_r50_${precision}_b" 100 $py bench/methods.py --arch resnet50 --device cuda \
        --batch-sizes 1,8 --methods gradcam,integrated-gradients,smoothgrad,gradient --ig-steps 50 \
        --sg-samples 25 --repeats 3 --budget 2 --precision $precision
    done
    moreau bf16
    ;;
  next)  # what the second H100 run left open (docs/benchmarks.md, "GPU: NVIDIA H100, second run"): is the
    # first-time work per thread, and do the padded, warmed pass threads remove the stall at 16 clients
    stage tests_cap 90 $py -m pytest -q -m gpu tests/test_calibrate.py
    stage firstpass 120 $py bench/firstpass.py --device cuda --sizes 1,2,3,5,8,13,16
    stage service_warm 330 $py bench/service.py --device cuda --scale 10 --methods gradcam \
      --clients 1,4,16,16 --workers thread,process
    ;;
  warm)  # one call (a 15-minute lease): the padding and per-size warm-up, unmeasured on a GPU since they landed
    # (the first pass per size; the warmed server at 1 and 16 clients, thread worker), then D-RISE against
    # vision-explanation-methods on the GPU (issue 27; carry its wheel: pip download --no-deps
    # vision-explanation-methods==0.1.1 facenet-pytorch==2.6.0)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
    stage firstpass 90 $py bench/firstpass.py --device cuda --sizes 1,2,3,5,8,13,16
    stage service_warm 240 $py bench/service.py --device cuda --scale 10 --methods gradcam --clients 1,16,16 \
      --workers thread
    stage drise 190 $py bench/drise.py --device cuda --detectors planted,frcnn,mtcnn --chunks 64,1 --curve '' \
      --threads 4
    ;;
  verify)  # what the H200 run of 2026-12-04 left unverified on a GPU: the detector pass budget measured from
    # memory, BatchNorm folding's check without TF32 (the log says "folded" or "serving the model unfolded"),
    # and the GPU tests; then the warmed service once more, folded this time
    stage tests_verify 200 $py -m pytest -q -m gpu tests/test_detection_budget.py tests/test_calibrate.py \
      tests/test_precision.py tests/test_fold.py
    stage fold_check 60 $py -c "import logging, torch; logging.basicConfig(level=logging.INFO)
from pathlib import Path
from service.zoo import ModelRegistry
m = ModelRegistry.from_dir(Path('models'), torch.device('cuda'), only={'efficientnet_lite0'}).models['efficientnet_lite0']
print('check: folded BatchNorms', m.folded_norms)"
    stage service_folded 240 $py bench/service.py --device cuda --scale 10 --methods gradcam --clients 1,16 \
      --workers thread
    ;;
  service2)  # the issue's service table with both workers, IG included
    stage service_both 400 $py bench/service.py --device cuda --ig-steps 50 --scale 10 --workers thread,process
    stage gil 120 $py bench/gil.py --device cuda --duty 0.5
    ;;
  autotune)  # the same service run with cuDNN autotuning on (a separate call: each must end within 600 s)
    SALIENCY_CUDNN_BENCHMARK=true stage service_autotune_on 200 $py bench/service.py --device cuda \
      --ig-steps 50 --scale 10 --workers process
    # this machine's host-side ceiling (the tiny CNN on its CPU): the event loop's CPU per request
    stage host 120 $py bench/host.py --workers thread,process --upload png
    ;;
  moreau)  # the issue's MoreauGrad target; fp16 with this many draws runs whole-pass autocast
    # (service/engine.py WHOLE_PASS_FP16_MIN_DRAWS), the only reduced precision that may speed up its forward
    stage tests_fp16 150 $py -m pytest -q -m gpu tests/test_precision.py -k moreaugrad
    moreau fp16
    moreau fp32
    ;;
  fold)  # BatchNorm folding (docs/benchmarks.md, "BatchNorm folding"): the engine on the folded model against
    # the model as built, then ours (folded) against Captum on the model as built, fp32 and bf16
    stage fold_lite0 150 $py bench/fold.py --device cuda
    for precision in fp32 bf16; do
      stage "methods_r50_${precision}_fold" 180 $py bench/methods.py --arch resnet50 --device cuda \
        --batch-sizes 1,8 --methods integrated-gradients,smoothgrad,gradient --ig-steps 50 --sg-samples 25 \
        --repeats 3 --budget 2 --precision $precision
    done
    ;;
  profile)  # where the steady state's time goes at 16 clients (the service table's new columns say whether the
    # worker or the host side is the limit; this says which threads and functions): both workers
    for worker in thread process; do
      stage "profile_$worker" 150 $py bench/server_profile.py --device cuda --worker $worker --clients 16 \
        --seconds 15 --out "$out"
    done
    ;;
  *) echo "unknown stage set: $1" >&2; exit 2 ;;
esac
cat "$out/summary.log"
