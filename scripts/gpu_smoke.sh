#!/usr/bin/env bash
# The first check on a GPU machine (about ten minutes): the toy through the GPU path on 1 or 2 GPUs, a few
# steps of each stage plus evaluation, packed-vs-padded log-probs on the GPU, then a table of what ran
# (engine, vLLM model runner, attention kernel, process group, FSDP2, precision) with the peak GPU memory
# of each stage (nvidia-smi, sampled every 0.5 s: trainer and vLLM together) next to the memory plan's.
#
#     bash scripts/gpu_smoke.sh                    # vLLM GPU build (sleep mode), all GPUs up to 2
#     bash scripts/gpu_smoke.sh --engine hf        # no vLLM (a machine without it): HF generate
#     bash scripts/gpu_smoke.sh --gpus 1 --steps 2 --out runs/gpu-smoke
#     bash scripts/gpu_smoke.sh --dry-run          # print the commands, run nothing (works without a GPU)
#     bash scripts/gpu_smoke.sh --no-install       # preinstalled torch >= 2.11 + transformers, no vLLM, no internet
#
# Stages: toy data + model, the memory plan of the grpo stage, sft.py, the log-prob check
# (scripts/gpu_checks.py), grpo.py --vas (rollouts, VAS re-scoring, validation, weight pushes), eval.py;
# each under torchrun (nccl; FSDP2 with bf16 mixed precision when --gpus 2, autocast over fp32 weights
# with 1). If grpo fails with vLLM, it runs again on vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0).
# --no-install: whatever Python is there (HF generate, no vLLM); a stage whose modules are missing is
# skipped with one line saying which (the log-prob check then runs on the toy's initial model).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_smoke.sh: $1" >&2; exit 2; }
engine=vllm
engine_given=
no_install=0
gpus=
steps=3
out=runs/gpu-smoke
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --engine) [ $# -ge 2 ] || die "--engine needs hf or vllm"; engine=$2; engine_given=$2; shift ;;
        --gpus) [ $# -ge 2 ] || die "--gpus needs 1 or 2"; gpus=$2; shift ;;
        --steps) [ $# -ge 2 ] || die "--steps needs a number"; steps=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift ;;
        --dry-run) dry=1 ;;
        --no-install) no_install=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
    shift
done
case "$engine" in hf|vllm) ;; *) die "--engine $engine: use hf or vllm" ;; esac
if [ "$no_install" = 1 ]; then
    [ "$engine_given" != vllm ] || die "--no-install runs without vLLM: leave out --engine vllm (HF generate)"
    engine=hf
fi
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
grpo_flags="--vas --engine $engine --data $data@train --val-data $data@val --train-limit 64 --val-limit 32 \
--rollout-batch-size 8 --max-steps $steps --vas-rollouts 4 --vas-update-every 2 --val-every 2 --save-every 0"
grpo_cmd() { echo "${launch[*]} grpo.py --model $out/sft/final $grpo_flags --output-dir $out/$1"; }  # output folder
eval_cmd() {  # the grpo folder whose final/ it evaluates
    echo "${launch[*]} eval.py --engine $engine --model $out/$1/final --benchmarks toy --bench-data \
toy=$data/test.parquet --max-new-tokens 64 --max-prompt-length 1024 --limit 64 --output-dir $out/eval"
}
toy_cmd="$py -c 'from data import toy; toy.ensure_toy()'"
if [ "$no_install" = 1 ]; then  # without pyarrow no toy data can be written; the model still can
    toy_cmd="$py -c 'import importlib.util; from data import toy; toy.ensure_toy() if importlib.util.find_spec(\"pyarrow\") else toy.build_toy_model()'"
fi
stages=(
    "toy|$toy_cmd"
    "plan|$py scripts/gpu_checks.py plan --model runs/toy-init --gpus $gpus -- $grpo_flags"
    "sft|${launch[*]} sft.py --max-steps $((steps * 10)) --output-dir $out/sft --eval-every 0 --save-every 0"
    "logprobs|$py scripts/gpu_checks.py logprobs --model $out/sft/final"
    "grpo|$(grpo_cmd grpo)"
    "eval|$(eval_cmd grpo)"
)
v1=VLLM_USE_V2_MODEL_RUNNER=0  # vLLM 0.33 runs its V2 model runner on GPU by default; the CPU tests ran V1
if [ "$dry" = 1 ]; then
    for s in "${stages[@]}"; do echo "${s%%|*}: ${s#*|}"; done
    if [ "$engine" = vllm ]; then echo "grpo-v1 (if grpo fails): $v1 $(grpo_cmd grpo-v1)"; fi
    exit 0
fi

# --- checks before any stage -----------------------------------------------------------------
"$py" - "$engine" "$no_install" <<'PY'
import sys

import torch

from mmr1 import attention

version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if sys.argv[2] == "1" and version < (2, 11):
    sys.exit(f"gpu_smoke.sh: --no-install needs torch >= 2.11 (its varlen attention kernel); this is {torch.__version__}")
if not torch.cuda.is_available():
    sys.exit(f"gpu_smoke.sh: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver too old?)")
if sys.argv[1] == "vllm":
    try:
        import vllm
    except ImportError:
        sys.exit("gpu_smoke.sh: vllm does not import; pip install -r requirements-gpu.txt, or run with --engine hf")
    print(f"vllm {vllm.__version__}")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, attention "
      f"{attention.attention_implementation(torch.device('cuda', 0))}")
PY
attention=$("$py" -c "import torch; from mmr1 import attention; print(attention.attention_implementation(torch.device('cuda', 0)))")
mkdir -p "$out"
declare -A skip=()  # stage -> why it cannot run here (--no-install: a module missing)
if [ "$no_install" = 1 ]; then
    while IFS='|' read -r stage why; do
        [ -n "$stage" ] && skip[$stage]=$why
    done < <("$py" - <<'PY'
import importlib.util

needs = {"plan": ("datasets", "pyarrow", "math_verify"), "sft": ("datasets", "pyarrow"),
         "grpo": ("datasets", "pyarrow", "math_verify"),
         "eval": ("datasets", "pyarrow", "math_verify")}
for stage, modules in needs.items():
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{stage}|{', '.join(missing)} not installed (--no-install)")
PY
)
fi

# --- run each stage, sampling the GPUs' memory -----------------------------------------------
run_stage() {  # key, command: runs it with memory sampling into $out/<key>.*; sets status, seconds, peak
    local mem="$out/$1.memory.csv" sampler start
    echo "== $1: $2"
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$mem" &
    sampler=$!
    start=$(date +%s)
    status=ok
    bash -c "$2" > "$out/$1.log" 2>&1 || status="FAILED (see $out/$1.log)"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    seconds=$(( $(date +%s) - start ))
    peak=$(awk -F', *' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "%sGPU%s %.1f", (n++ ? ", " : ""), g, m[g] / 1024 }' "$mem")
    tail -n 3 "$out/$1.log"
}
planned() {  # stage key -> the plan's peak for it (GiB per GPU), read from plan.log
    local key
    case "$1" in sft) key="training peak" ;; grpo*) key="rollout peak" ;; *) echo "-"; return ;; esac
    sed -n "s/.*$key \([0-9.]*\) GiB.*/\1/p" "$out/plan.log" | head -n 1 | grep . || echo "?"
}
rows=()
grpo_dir=grpo
for s in "${stages[@]}"; do
    name=${s%%|*}
    cmd=${s#*|}
    if [ -n "${skip[$name]:-}" ]; then
        echo "== $name: skipped: ${skip[$name]}"
        rows+=("| $name | skipped: ${skip[$name]} | - | - | - |")
        continue
    fi
    [ "$name" = logprobs ] && [ -n "${skip[sft]:-}" ] && cmd=${cmd/$out\/sft\/final/runs\/toy-init}  # no SFT model here
    [ "$name" = eval ] && [ "$grpo_dir" = grpo-v1 ] && cmd="$v1 $(eval_cmd grpo-v1)"
    run_stage "$name" "$cmd"
    rows+=("| $name$([ "$name" = eval ] && [ "$grpo_dir" = grpo-v1 ] && echo " ($v1)") | $status | $seconds | ${peak:-?} | $(planned "$name") |")
    if [ "$name" = grpo ] && [ "$status" != ok ] && [ "$engine" = vllm ]; then
        grpo_dir=grpo-v1
        run_stage grpo-v1 "$v1 $(grpo_cmd grpo-v1)"
        rows+=("| grpo ($v1) | $status | $seconds | ${peak:-?} | $(planned grpo) |")
    fi
    [ "$status" = ok ] || break
done

runner=$(grep -h -o "\[vllm\] model runner V[12]" "$out/$grpo_dir.log" 2>/dev/null | head -n 1 | sed 's/\[vllm\] //')
fsdp=$([ "$gpus" -ge 2 ] && echo "FSDP2 over $gpus ranks, bf16 compute on fp32 master weights" \
    || echo "one rank (no sharding), bf16 autocast over fp32 weights")
{
    echo
    echo "engine $engine$([ "$engine" = vllm ] && echo " (sleep mode, ${runner:-model runner not reported})"), attention $attention, nccl, $fsdp"
    grep -h "packed vs padded" "$out/logprobs.log" 2>/dev/null || true
    grep -h "^plan:" "$out/plan.log" 2>/dev/null || true
    echo
    echo "| stage | status | seconds | peak GiB per GPU (nvidia-smi) | plan GiB per GPU |"
    echo "| --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
} | tee "$out/summary.md"
grep -q FAILED "$out/summary.md" && exit 1 || exit 0
