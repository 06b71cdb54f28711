#!/usr/bin/env bash
# Installs the GPU path in a venv and checks that torch sees the GPUs: requirements-gpu.txt (vllm 0.33.0,
# which brings torch 2.14 for CUDA 13), then, only when asked, flash-attn in a step of its own.
#
#     bash scripts/setup_gpu.sh                     # .venv-gpu: a few minutes (downloads ~5 GB)
#     bash scripts/setup_gpu.sh --flash-attn        # also flash-attn 2.8.3, compiled (see below)
#     bash scripts/setup_gpu.sh --venv /path/venv   # another venv folder
#     PYTHON=python3.12 bash scripts/setup_gpu.sh   # the Python the venv is made from (>= 3.11)
#
# Python >= 3.11: vllm 0.33.0 publishes no wheel for older ones (Ubuntu 22.04's python3 is 3.10, and
# pip then finds no vllm at all), so that is checked first.
# flash-attn is a source package whose setup.py imports torch: inside `pip install -r ...` pip builds it
# in an isolated environment without torch, the build fails and the whole install aborts. So it is
# installed after torch, with --no-build-isolation. flash-attn 2.8.3 has no prebuilt wheel for torch
# 2.14, so it COMPILES: it needs the CUDA 13 toolkit's nvcc (the CUDA torch was built with) found through
# CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda-13.0), ninja, and several GB of RAM per parallel job
# (MAX_JOBS, default 8 here); building for Hopper only (FLASH_ATTN_CUDA_ARCHS=90, the default here)
# takes tens of minutes on a large node, all architectures an hour or more (estimates, not measured).
# It is optional: without it the packed log-prob passes and the vision tower use
# torch.nn.attention.varlen.varlen_attn, the same flash-attention-2 kernel built into torch.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
venv=.venv-gpu
flash=0
while [ $# -gt 0 ]; do
    case "$1" in
        --flash-attn) flash=1 ;;
        --venv) [ $# -ge 2 ] || { echo "setup_gpu.sh: --venv needs a folder" >&2; exit 2; }; venv=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup_gpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
    echo "setup_gpu.sh: error: $python is Python $("$python" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(not found)'); vllm 0.33.0 needs >= 3.11 (try PYTHON=python3.11 or python3.12)" >&2
    exit 2
}
if [ "$flash" = 1 ]; then  # before the long install: the compile needs CUDA 13's nvcc through CUDA_HOME
    nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    release=$( ("$nvcc" --version 2>/dev/null || true) | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
    [ "$release" = 13 ] || {
        echo "setup_gpu.sh: error: --flash-attn compiles flash-attn 2.8.3 and needs CUDA 13's nvcc; $nvcc is ${release:+CUDA $release}${release:-missing} (set CUDA_HOME to a CUDA 13 toolkit)" >&2
        exit 2
    }
fi
"$python" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -r requirements-gpu.txt

# torch 2.14's CUDA build needs a recent NVIDIA driver; with an older one torch.cuda.is_available() is
# False and every stage would quietly run on the CPU (--preset paper refuses to).
"$py" - <<'PY'
import subprocess
import sys

import torch

driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.split("\n")[0] or "none found (nvidia-smi)"
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU; NVIDIA driver: "
             f"{driver}. Update the driver to one that supports CUDA {torch.version.cuda} (docs/gpu.md).")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), driver {driver}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name(0)}")
PY

if [ "$flash" = 1 ]; then
    "$py" -m pip install -q ninja packaging wheel psutil  # what its build needs beside torch
    echo "compiling flash-attn 2.8.3 (no wheel for torch 2.14): tens of minutes; MAX_JOBS=${MAX_JOBS:-8}"
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-8} \
        "$py" -m pip install "flash-attn==2.8.3" --no-build-isolation
fi
"$py" -c "import torch; from mmr1 import attention; print('attention:', attention.attention_implementation(torch.device('cuda', 0)))"
echo "done: . $venv/bin/activate && bash scripts/gpu_smoke.sh"
