#!/usr/bin/env bash
# The GPU checks of issue #9 in one call on a CUDA machine (the device tool's `run`, from the repo root):
# the native Triton kernel cases (tests/triton_cases.py, the same cases CI runs interpreted) and the GPU
# benchmark (optim-plugins bench --suite gpu). Writes gpu.md and gpu_tests.log to $OUT (else benchmarks/).
# Runs from the source tree (PYTHONPATH), nothing installed; about 3-5 minutes on one H100.
# bitsandbytes rows (the 8-bit target) need its wheel beside, as the GPU machine reaches no index: here
#   pip download bitsandbytes==0.50.2 --no-deps --python-version 3.12 --platform manylinux_2_24_x86_64 \
#     --only-binary=:all: -d .gpu_wheels && echo /.gpu_wheels/ >> .git/info/exclude
# (43 MB) and `carry: [".gpu_wheels"]` in the device call.
set -uo pipefail
out=${OUT:-benchmarks}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".gpu_wheels/*.whl" > /dev/null; then pip install -q --no-deps --no-index .gpu_wheels/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_tests.log"
python -c "import torch, triton, optim_plugins; print('torch', torch.__version__, 'triton', triton.__version__)" \
  2>&1 | tee -a "$out/gpu_tests.log" || exit 1
TRITON_INTERPRET=0 OPTIM_PLUGINS_TRITON_DEVICE=cuda timeout 300 \
  python -m pytest -q -rs -p no:cacheprovider -o addopts= tests/triton_cases.py 2>&1 | tail -n 30 | tee -a "$out/gpu_tests.log"
timeout 240 python -m optim_plugins.cli bench --suite gpu --repeats 20 -o "$out/gpu.md" > "$out/gpu_bench.log" 2>&1
tail -n 5 "$out/gpu_bench.log"; cat "$out/gpu.md"
