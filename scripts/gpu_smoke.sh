#!/usr/bin/env bash
# The toy through the GPU path on 1-2 GPUs, a few steps of each stage plus evaluation, then a table of
# what ran (engine, attention kernel, process group, FSDP2, precision) and the peak GPU memory of each
# stage (nvidia-smi, sampled every 0.5 s: trainer and vLLM together).
#
#     bash scripts/gpu_smoke.sh                    # vLLM GPU build (sleep mode), all GPUs up to 2: ~5 minutes
#     bash scripts/gpu_smoke.sh --engine hf        # no vLLM (a machine without it): HF generate
#     bash scripts/gpu_smoke.sh --gpus 1 --steps 2 --out runs/gpu-smoke
#     bash scripts/gpu_smoke.sh --dry-run          # print the commands, run nothing (works without a GPU)
#
# Stages: toy data + model, sft.py, grpo.py --vas (rollouts, VAS re-scoring, validation, weight pushes),
# eval.py; each under torchrun (nccl; FSDP2 with bf16 mixed precision when --gpus 2).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_smoke.sh: $1" >&2; exit 2; }
engine=vllm
gpus=
steps=3
out=runs/gpu-smoke
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) [ $# -ge 2 ] || die "--engine needs hf or vllm"; engine=$2; shift ;;
        --gpus) [ $# -ge 2 ] || die "--gpus needs 1 or 2"; gpus=$2; shift ;;
        --steps) [ $# -ge 2 ] || die "--steps needs a number"; steps=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift ;;
        --dry-run) dry=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done
case "$engine" in hf|vllm) ;; *) die "--engine $engine: use hf or vllm" ;; esac
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || die "--steps $steps: a positive whole number"
py=${PYTHON:-python}

if [ -z "$gpus" ]; then
    if [ "$dry" = 1 ]; then
        gpus=1
    else
        gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
        [ "$gpus" -ge 1 ] || die "no GPU found (nvidia-smi -L lists none); see docs/gpu.md"
        [ "$gpus" -le 2 ] || gpus=2
    fi
fi
case "$gpus" in 1|2) ;; *) die "--gpus $gpus: this smoke test runs on 1 or 2 GPUs" ;; esac

# --- what will run ---------------------------------------------------------------------------
data=data/toy/rl
launch=("$py" -m torch.distributed.run --nproc_per_node "$gpus" --master_port "${MASTER_PORT:-29533}")
stages=(
    "toy|$py -c 'from data import toy; toy.ensure_toy()'"
    "sft|${launch[*]} sft.py --max-steps $((steps * 10)) --output-dir $out/sft --eval-every 0 --save-every 0"
    "grpo|${launch[*]} grpo.py --vas --engine $engine --model $out/sft/final --data $data@train --val-data $data@val \
--train-limit 64 --val-limit 32 --rollout-batch-size 8 --max-steps $steps --vas-rollouts 4 --vas-update-every 2 \
--val-every 2 --save-every 0 --output-dir $out/grpo"
    "eval|${launch[*]} eval.py --engine $engine --model $out/grpo/final --benchmarks toy \
--bench-data toy=$data/test.parquet --max-new-tokens 64 --max-prompt-length 1024 --limit 64 --output-dir $out/eval"
)
if [ "$dry" = 1 ]; then
    for s in "${stages[@]}"; do echo "${s%%|*}: ${s#*|}"; done
    exit 0
fi

# --- checks before any stage -----------------------------------------------------------------
"$py" - "$engine" <<'PY'
import sys

import torch

from mmr1 import modeling

if not torch.cuda.is_available():
    sys.exit(f"gpu_smoke.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver too old?)")
if sys.argv[1] == "vllm":
    try:
        import vllm
    except ImportError:
        sys.exit("gpu_smoke.sh: vllm does not import; pip install -r requirements-gpu.txt, or run with --engine hf")
    print(f"vllm {vllm.__version__}")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, attention "
      f"{modeling.attention_implementation(torch.device('cuda', 0))}")
PY
attention=$("$py" -c "import torch; from mmr1 import modeling; print(modeling.attention_implementation(torch.device('cuda', 0)))")
mkdir -p "$out"

# --- run each stage, sampling the GPUs' memory -----------------------------------------------
rows=()
for s in "${stages[@]}"; do
    name=${s%%|*}
    cmd=${s#*|}
    echo "== $name: $cmd"
    mem="$out/$name.memory.csv"
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$mem" &
    sampler=$!
    start=$(date +%s)
    status=ok
    bash -c "$cmd" > "$out/$name.log" 2>&1 || status="FAILED (see $out/$name.log)"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    seconds=$(( $(date +%s) - start ))
    peak=$(awk -F', *' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "%sGPU%s %.1f GiB", (n++ ? ", " : ""), g, m[g] / 1024 }' "$mem")
    rows+=("| $name | $status | $seconds | ${peak:-?} |")
    tail -n 3 "$out/$name.log"
    [ "$status" = ok ] || break
done

fsdp=$([ "$gpus" -ge 2 ] && echo "FSDP2 over $gpus ranks, bf16 compute on fp32 master weights" || echo "one rank (no sharding), bf16 autocast")
{
    echo
    echo "engine $engine$([ "$engine" = vllm ] && echo ' (sleep mode)'), attention $attention, nccl, $fsdp"
    echo
    echo "| stage | status | seconds | peak memory (nvidia-smi) |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} | tee "$out/summary.md"
grep -q FAILED "$out/summary.md" && exit 1 || exit 0
