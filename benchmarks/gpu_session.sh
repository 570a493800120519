#!/usr/bin/env bash
# One device call of the GPU plan, run on the GPU machine from the repository root:
#
#   bash benchmarks/gpu_session.sh tests   # pytest -m gpu (CUDA graphs, generate.py on a GPU)
#   bash benchmarks/gpu_session.sh b8      # bench_gpu.py --batch 8
#   bash benchmarks/gpu_session.sh b1      # the same at batch 1
#   bash benchmarks/gpu_session.sh b64     # batch 64: eager and compiled only, 5 timed calls
#   bash benchmarks/gpu_session.sh train   # bench_train.py, SiT-XL/2 refiner, batch 18, bf16:
#                                          # float32 targets (the default) and --base-autocast
#
# The session's 30 minutes of device time hold about three of these calls with the machine's
# start: the most valuable first, b8 (the paper's batch), then tests, then b1; train and b64
# if time is left.
#
# bench_gpu.py: SiT-XL/2 at 256 px, random weights, bf16, guidance 1.5, SD VAE decode included;
# H8, H2P4R2, H1P5R3, H8P9R5, H24, each eager, compiled per step kind and whole sampler
# (issue 4's GPU table and the paper's pairs). Each step is one 10-minute call; most of it is
# compilation (SiT-XL/2 takes 30-90 s per compiled program, and each step kind, the decoder and
# the whole sampler's networks are compiled per batch size), so the rows are written after each
# schedule and a call cut short keeps the schedules it finished. Hence also no --profile (it
# compiles the whole sampler once more) and, at batch 64, where launches cost little, no
# whole-sampler mode.
#
# The GPU machine lacks hydra, omegaconf, webdataset, torch-fidelity, diffusers and what they
# need: `bash benchmarks/gpu_wheels.sh` here first (it fills .whl), and name .whl in the call's
# carry. Logs and results are written straight to $OUT, which the device tool brings back; copy
# the JSON files into experiments/gpu/ afterwards.
set -euo pipefail

step=${1:?usage: bash benchmarks/gpu_session.sh tests|b1|b8|b64|train}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  echo "no .whl/*.whl (bash benchmarks/gpu_wheels.sh): tests needing hydra or diffusers, the" \
    "decode of bench_gpu.py and bench_train.py (webdataset) fail" >&2
  export PYTHONPATH=.
fi
export WANDB_MODE=disabled # no wandb there
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >>"$out/gpu.txt"
# what imports there, and which versions (diffusers needs a recent huggingface_hub, which the
# GPU machine's timm brings; a failure here shows before any compilation is paid for)
python3 - >>"$out/gpu.txt" 2>&1 <<'PY' || true
import importlib

for name in ("lightning", "hydra", "webdataset", "torch_fidelity", "huggingface_hub",
             "diffusers", "filelock"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        print(name, "FAILED:", type(error).__name__, error)
PY
cat "$out/gpu.txt"

status=0
case "$step" in
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 \
      | tee "$out/test_gpu.txt" || status=$?
    ;;
  b1 | b8)
    python3 benchmarks/bench_gpu.py --batch "${step#b}" \
      --out "$out/bench_gpu_$step.json" 2>&1 | tee "$out/bench_gpu_$step.txt" || status=$?
    ;;
  b64)
    python3 benchmarks/bench_gpu.py --batch 64 --modes eager compiled --repeats 5 --warmup 2 \
      --out "$out/bench_gpu_$step.json" 2>&1 | tee "$out/bench_gpu_$step.txt" || status=$?
    ;;
  train)
    for targets in "" --base-autocast; do
      python3 benchmarks/bench_train.py --model SiT-XL/2 --channels 4 --classes 1000 \
        --learn-sigma --batch-size 18 --precision bf16-mixed --accelerator gpu $targets \
        --out "$out/bench_train${targets:+_autocast}.json" 2>&1 \
        | tee -a "$out/bench_train.txt" || status=$?
    done
    ;;
  *)
    echo "unknown step $step: tests, b1, b8, b64 or train" >&2
    exit 2
    ;;
esac
exit "$status"
