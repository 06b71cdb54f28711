#!/usr/bin/env bash
# Installs the GPU path in a venv and checks that torch sees the GPUs: requirements-gpu.txt (vllm 0.33.0,
# which brings torch 2.14 for CUDA), then, only when asked, flash-attn in a step of its own.
#
#     bash scripts/setup_gpu.sh                     # .venv-gpu: a few minutes (downloads ~5 GB)
#     bash scripts/setup_gpu.sh --flash-attn        # also flash-attn 2.8.3 (compiles ~1 h where no wheel matches)
#     bash scripts/setup_gpu.sh --venv /path/venv   # another venv folder
#
# flash-attn is a source package whose setup.py imports torch: inside `pip install -r ...` pip builds it
# in an isolated environment without torch, the build fails and the whole install aborts. So it is
# installed after torch, with --no-build-isolation. It is optional: without it the packed log-prob
# passes use torch.nn.attention.varlen.varlen_attn, the same flash-attention-2 kernel built into torch.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
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

python3 -m venv "$venv"
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
    "$py" -m pip install -q ninja packaging wheel  # what its build needs beside torch
    MAX_JOBS=${MAX_JOBS:-8} "$py" -m pip install "flash-attn==2.8.3" --no-build-isolation
fi
"$py" -c "import torch; from mmr1 import modeling; print('attention:', modeling.attention_implementation(torch.device('cuda', 0)))"
echo "done: . $venv/bin/activate && bash scripts/gpu_smoke.sh"
