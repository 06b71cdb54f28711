"""One GRPO step here vs TRL's GRPOTrainer on identical shapes, CPU: the toy-init model, 2 prompts
x 8 responses x 32 tokens, temperature 0.6, lr 1e-4, no KL (no reference model), one update per
batch, an accuracy reward, one thread. Whole-process time of each run and the time of its steps.

    python data/toy.py                                              # toy data + runs/toy-init, once
    python -m venv .venv-trl                                        # TRL in its own venv, no second torch:
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-trl/lib/python3.11/site-packages/main.pth
    .venv-trl/bin/pip install --no-deps trl==1.16.0 accelerate
    python bench/trl_step_bench.py --trl-python .venv-trl/bin/python   # ~3 minutes; the last line is the summary

Ours runs grpo.py (packed, then --no-pack); TRL runs GRPOTrainer on the same rows, images and
model. Steps 1-2 are warm-up; the step time is the median of steps 3..N. Both runs sample their
own responses (a random model rarely stops before 32 tokens, so lengths are alike).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"prompts": 2, "group": 8, "tokens": 32, "lr": 1e-4, "temperature": 0.6}


def trl_run(steps: int, out: str) -> None:
    """Runs in the TRL venv: GRPOTrainer on the toy rows; writes per-step times to out."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    import reward
    from mmr1 import images, prepare

    torch.set_num_threads(1)
    rows = prepare.load_rows(str(ROOT / "data" / "toy" / "rl") + "@train", "rl", limit=64)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": r["problem"].replace("<image>", "")}]}],
         "image": images.load_image(r["images"][0]), "answer": r["answer"]}
        for r in rows
    ])  # fmt: skip

    def accuracy(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward.accuracy_reward(t, a) for t, a in zip(texts, answer)]

    times = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=SHAPES["prompts"] * SHAPES["group"],
        num_generations=SHAPES["group"], max_completion_length=SHAPES["tokens"], temperature=SHAPES["temperature"],
        learning_rate=SHAPES["lr"], lr_scheduler_type="constant", beta=0.0, num_iterations=1, max_steps=steps,
        logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0,
        seed=0, log_completions=False,
    )  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(ROOT / "runs" / "toy-init", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(ROOT / "runs" / "toy-init", padding_side="left")
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=args, train_dataset=dataset,
                          processing_class=processor, callbacks=[StepTimes()])  # fmt: skip
    trainer.train()
    Path(out).write_text(json.dumps(times))


def ours_steps(steps: int, pack: bool) -> list[float]:
    """grpo.py on the same shapes; returns its per-step seconds (rollout + rewards + update + logging)."""
    out = Path(tempfile.mkdtemp()) / "run"
    cmd = [sys.executable, "grpo.py", "--model", "runs/toy-init", "--data", "data/toy/rl@train", "--val-data", "",
           "--output-dir", str(out), "--max-steps", str(steps), "--rollout-batch-size", str(SHAPES["prompts"]),
           "--group-size", str(SHAPES["group"]), "--max-response-length", str(SHAPES["tokens"]),
           "--temperature", str(SHAPES["temperature"]), "--lr", str(SHAPES["lr"]), "--kl-coef", "0",
           "--updates-per-batch", "1", "--reward-workers", "0", "--save-every", "0", "--val-every", "0",
           "--train-limit", "64", "--pack" if pack else "--no-pack"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [b["time"] - a["time"] for a, b in zip(lines, lines[1:])]  # step k = time between the lines of k-1, k


def trl_steps(python: str, steps: int) -> list[float]:
    """TRL's side in its own venv (this file with --trl-run); returns its per-step seconds."""
    out = Path(tempfile.mkdtemp()) / "trl.json"
    cmd = [python, __file__, "--trl-run", str(out), "--steps", str(steps)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trl-python", default=".venv-trl/bin/python", help="python of a venv with trl installed")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--trl-run", default="", help=argparse.SUPPRESS)  # internal: the TRL side, in its venv
    args = parser.parse_args()
    if args.trl_run:
        trl_run(args.steps, args.trl_run)
        return
    runs = {
        "ours (packed)": lambda: ours_steps(args.steps, pack=True),
        "ours (--no-pack)": lambda: ours_steps(args.steps, pack=False),
        "TRL GRPOTrainer": lambda: trl_steps(args.trl_python, args.steps),
    }
    results = {}
    for name, run in runs.items():
        start = time.perf_counter()
        steps = run()
        results[name] = (time.perf_counter() - start, statistics.median(steps[-(args.steps - 2) :]))  # steps 3..N
    print(f"| run ({args.steps} steps) | whole process s | median step s (steps 3-{args.steps}) |")
    print("| --- | --- | --- |")
    for name, (seconds, step) in results.items():
        print(f"| {name} | {seconds:.1f} | {step:.3f} |")
    ours, trl = results["ours (packed)"], results["TRL GRPOTrainer"]
    print(f"ours/TRL whole process {ours[0] / trl[0]:.2f}, step {ours[1] / trl[1]:.2f}")


if __name__ == "__main__":
    main()
