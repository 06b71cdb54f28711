"""Does this GRPO learn as TRL's GRPOTrainer does? Both from the same slip-toy SFT checkpoint, then
greedy accuracy and slip share on the 200 validation prompts.

    OMP_NUM_THREADS=1 python bench/rl_bench.py --seeds 0         # the SFT checkpoint and our GRPO run
    python -m venv .venv-trl                                      # TRL in its own venv, no second torch:
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-trl/lib/python3.11/site-packages/main.pth
    .venv-trl/bin/pip install --no-deps trl==1.16.0 accelerate
    OMP_NUM_THREADS=1 python bench/trl_learning_bench.py --seed 0 --trl-python .venv-trl/bin/python

Settings matched to grpo.py's defaults as bench/rl_bench.py runs them: the first 512 slip train
prompts, 16 prompts x 8 responses per rollout batch, 30 rollout batches, 2 optimizer steps per
batch (TRL: num_iterations 2, so max_steps 60), T = 0.6, 64 tokens, lr 1e-4 constant, AdamW weight
decay 0.01, clip 0.2, KL (k3) 0.01 to the SFT model, grad clip 1.0, token-mean loss over the batch
(TRL: loss_type "dapo"), advantages scaled by the group std, reward = format + accuracy (reward.py).
Differences left: each trainer's own sampling and data order (seeded, not the same draws).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmr1.config import exit_on_input_error, read_jsonl  # noqa: E402

SLIP = ROOT / "data" / "toy-slip"


def trl_prompts(spec: str, limit: int) -> list[dict]:
    """The first `limit` RL rows of `spec` (mmr1.data.load_rows, as grpo.py reads them) in TRL's
    conversational layout: a user turn of one image and the problem text, the image, the answer."""
    from mmr1 import images, prepare

    rows = prepare.load_rows(spec, "rl", limit=limit)
    return [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": r["problem"].replace("<image>", "")}],
                }
            ],
            "image": images.load_image(r["images"][0]),
            "answer": r["answer"],
        }
        for r in (rows[i] for i in range(len(rows)))
    ]


def trl_run(sft_model: str, out: str, seed: int, batches: int) -> None:
    """Runs in the TRL venv: GRPOTrainer from sft_model; saves out/final and out/log_history.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    import reward

    torch.set_num_threads(1)
    data = Dataset.from_list(trl_prompts(f"{SLIP / 'rl'}@train", 512))

    def texts(completions) -> list[str]:
        return [c[-1]["content"] if isinstance(c, list) else c for c in completions]

    def accuracy(completions, answer, **_):
        return [reward.accuracy_reward(t, a) for t, a in zip(texts(completions), answer)]

    def format_(completions, **_):
        return [reward.format_reward(t) for t in texts(completions)]

    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=16 * 8, num_generations=8, max_completion_length=64,
        temperature=0.6, top_p=1.0, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, max_grad_norm=1.0, beta=0.01, epsilon=0.2, num_iterations=2, loss_type="dapo",
        scale_rewards="group", max_steps=2 * batches, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, bf16=False, dataloader_num_workers=0, seed=seed, log_completions=False,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(sft_model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(sft_model, padding_side="left")
    trainer = GRPOTrainer(model=model, reward_funcs=[format_, accuracy], args=args, train_dataset=data,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    trainer.save_model(str(Path(out) / "final"))
    processor.save_pretrained(str(Path(out) / "final"))
    (Path(out) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


def evaluate(models: list[str], out: Path) -> dict[str, dict]:
    """eval.py greedy on the 200 slip val prompts; per model: accuracy and slip share."""
    from bench.rl_bench import slip_stats

    cmd = [sys.executable, "eval.py", "--model", ",".join(models), "--benchmarks", "toy",
           "--bench-data", f"toy={SLIP / 'rl' / 'val.parquet'}", "--engine", "hf", "--max-new-tokens", "64",
           "--min-pixels", "3136", "--max-pixels", "50176", "--output-dir", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    import datasets

    val = datasets.load_dataset("parquet", data_files=str(SLIP / "rl" / "val.parquet"), split="train")
    rows = {r["id"]: r for r in val.remove_columns("images").to_list()}
    results = {}
    for m in models:
        name = Path(m).parent.name if Path(m).name == "final" else Path(m).name  # eval.py's run_name
        records = read_jsonl(out / name / "toy.jsonl")
        results[m] = slip_stats(records, rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--seed", type=int, default=0, help="which rl_bench seed: its SFT start and GRPO run")
    parser.add_argument("--bench-out", default=str(ROOT / "runs" / "rl-bench"), help="bench/rl_bench.py's --out")
    parser.add_argument("--trl-python", default=".venv-trl/bin/python", help="python of a venv with trl installed")
    parser.add_argument("--batches", type=int, default=30, help="rollout batches (grpo.py --max-steps)")
    parser.add_argument("--trl-run", default="", help=argparse.SUPPRESS)  # internal: the TRL side, in its venv
    parser.add_argument("--sft-model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_run:
        trl_run(args.sft_model, args.trl_run, args.seed, args.batches)
        return
    bench = Path(args.bench_out)
    sft, ours = bench / f"sft-seed{args.seed}" / "final", bench / f"grpo-seed{args.seed}" / "final"
    if not (ours / "config.json").exists():
        raise SystemExit(f"error: no GRPO run at {ours}: run `python bench/rl_bench.py --seeds {args.seed}` first")
    trl_out = bench / f"trl-seed{args.seed}"
    if not (trl_out / "final" / "config.json").exists():
        cmd = [args.trl_python, __file__, "--trl-run", str(trl_out), "--sft-model", str(sft), "--seed",
               str(args.seed), "--batches", str(args.batches)]  # fmt: skip
        with (bench / f"trl-seed{args.seed}.log").open("w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    results = evaluate([str(sft), str(ours), str(trl_out / "final")], bench / f"trl-eval-seed{args.seed}")
    lines = ["| model | val accuracy (greedy, 200) | slip share | count right |", "| --- | --- | --- | --- |"]
    for label, m in zip(["SFT start", "this GRPO", "TRL GRPOTrainer"], results):
        r = results[m]
        lines.append(f"| {label} | {r['accuracy']:.3f} | {r['slip']:.3f} | {r['count_right']:.3f} |")
    table = "\n".join(lines)
    (bench / f"trl-seed{args.seed}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    exit_on_input_error(main)  # a broken record file: one line, exit 1
