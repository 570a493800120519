#!/usr/bin/env bash
# One device call of the GPU plan, run on the GPU machine from the repository root:
#
#   bash benchmarks/gpu_session.sh tests      # pytest -m gpu (CUDA graphs, generate.py on a GPU)
#   bash benchmarks/gpu_session.sh bench8     # bench_gpu.py --batch 8 --profile (issue 6 table)
#   bash benchmarks/gpu_session.sh bench1     # the same at batch 1
#   bash benchmarks/gpu_session.sh xl 64      # bench_sampler.py: SiT-XL/2, Heun and FlowTurbo,
#                                             # eager vs compiled, bf16, decode (issue 4's table;
#                                             # one batch size a call: 1, 8 or 64)
#
# Each step fits one 10-minute call. The GPU machine lacks hydra, omegaconf, webdataset,
# torch-fidelity and diffusers: download their wheels into .whl first, on a machine with the
# package index (../shared/GPU.md gives the two commands; add `filelock>=3.30` to the first,
# train.py's run lock needs it and the GPU machine's copy may be older), and name .whl in the
# call's carry.
# Logs and results (experiments/gpu/) are copied to $OUT, which the device tool brings back.
set -euo pipefail

step=${1:?usage: bash benchmarks/gpu_session.sh tests|bench8|bench1|xl <batch>}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out" experiments/gpu

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  echo "no .whl/*.whl: the library core runs, tests needing hydra or diffusers will fail" >&2
  export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.txt" || true
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" >>"$out/gpu.txt"

status=0
case "$step" in
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt" \
      || status=$?
    ;;
  bench8 | bench1)
    python3 benchmarks/bench_gpu.py --batch "${step#bench}" --profile 2>&1 \
      | tee "$out/$step.txt" || status=$?
    ;;
  xl)
    batch=${2:?usage: bash benchmarks/gpu_session.sh xl 1|8|64}
    python3 benchmarks/bench_sampler.py --models SiT-XL/2 --batch "$batch" --dtype bf16 \
      --decode --schedules H8 H24 H1P5R3 H2P4R2 H8P9R5 --modes eager compiled --repeats 20 \
      --out "experiments/gpu/bench_sampler_xl_b$batch.json" 2>&1 | tee "$out/xl_b$batch.txt" \
      || status=$?
    ;;
  *)
    echo "unknown step $step: tests, bench8, bench1 or xl <batch>" >&2
    exit 2
    ;;
esac
cp -r experiments/gpu "$out/" 2>/dev/null || true
exit "$status"
