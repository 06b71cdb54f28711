"""Cold-start SFT of Qwen2.5-VL on chain-of-thought data (loss on assistant tokens only).

    python sft.py                                                  # toy: builds toy model + data, ~3 min on CPU
    python sft.py --preset paper --model Qwen/Qwen2.5-VL-7B-Instruct --data MMR1/MMR1-SFT
    torchrun --nproc_per_node 8 sft.py --preset paper --model Qwen/Qwen2.5-VL-7B-Instruct --data MMR1/MMR1-SFT
    python sft.py --resume                                         # continue from the latest step-N

Writes <output-dir>/step-N/ every --save-every steps and <output-dir>/final/ (HF format, bf16, loadable
with from_pretrained; grpo.py and eval.py read runs/toy-sft/final by default). SIGTERM or SIGUSR1
(preemption): finish the step, save step-N, exit 0 (docs/checkpoints.md).
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import reward
from data import toy
from mmr1 import batches, checkpoint, config, dist, logprobs, modeling, prepare, rollout, run
from mmr1.config import field
from mmr1.families import check_packing


@dataclass
class SFTConfig(config.TrainingFlags):
    """Cold-start supervised fine-tuning of Qwen2.5-VL (toy task when --model/--data are not given)."""

    model: str = field("", "hub id or local folder of the initial model (default: the toy model)")
    data: str = field("", "SFT rows: hub id, parquet/jsonl file or folder, name@split (default: toy)")
    val_data: str = field("", "SFT rows for the validation loss (default: toy val split)")
    acc_data: str = field("", "RL-format rows for the final validation accuracy (default: toy val split)")
    output_dir: str = field("runs/toy-sft", "checkpoints, metrics.jsonl and final/ (toy slip: runs/toy-slip-sft)")
    toy: str = field(
        "default", toy.VARIANT_HELP + " (supplies whichever of --model / --data is missing)", choices=list(toy.VARIANTS)
    )
    preset: str = field("", "'paper' = Table 5 hyper-parameters of the paper", choices=["", "paper"])
    epochs: float = field(1.0, "passes over the training rows (ignored when --max-steps > 0)", at_least=0.0)
    max_steps: int = field(300, "optimizer steps; 0 = derived from --epochs", at_least=0)
    batch_size: int = field(32, "effective global batch (rows per optimizer step, all ranks)", at_least=1)
    micro_batch_size: int = field(
        16, "rows per forward/backward on one rank (a cap when --max-tokens-per-micro-batch > 0)", at_least=1
    )
    lr: float = field(2e-3, "peak AdamW learning rate", above=0.0)
    warmup_ratio: float = field(0.1, "share of steps warming up linearly, then cosine to 0", at_least=0.0, at_most=1.0)
    weight_decay: float = field(0.0, "AdamW weight decay", at_least=0.0)
    max_length: int = field(0, "cut sequences to this many tokens (0 = no cut)", at_least=0)
    freeze_vision: bool = field(False, "keep the vision tower frozen")
    eval_every: int = field(100, "validation loss every N steps (0 = only at the end)", at_least=0)
    val_limit: int = field(200, "rows used for the validation loss (0 = all)", at_least=0)
    acc_limit: int = field(200, "rows used for the final validation accuracy (0 = all, -1 = skip)", at_least=-1)
    acc_max_new_tokens: int = field(64, "generation budget of the validation accuracy", at_least=1)
    save_every: int = field(100, "checkpoint every N steps (0 = only final)", at_least=0)
    seed: int = field(0, "seed of the data order and the init", at_least=0)


# fmt: off
PRESETS = {
    # Table 5 of the paper; the micro-batch cap and the save limit: docs/sft.md
    "paper": dict(
        epochs=3.0, max_steps=0, lr=1e-5, warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, batch_size=32,
        micro_batch_size=4, max_tokens_per_micro_batch=16384, max_length=16384, gradient_checkpointing=True,
        min_pixels=7056, max_pixels=1048576, eval_every=500, save_every=1000, save_total_limit=3, acc_limit=-1,
    ),
}
# fmt: on


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def global_batch(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: a seeded permutation per epoch, walked in order. A pure function
    of (step, seed), so a resumed run sees exactly the batches it would have; O(batch_size) per step."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n_rows)
        out.append(int(epoch_order(n_rows, seed, epoch)[offset]))
    return out


@functools.lru_cache(maxsize=4)  # a step spans at most two epochs (unless the batch outnumbers the rows)
def epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of `epoch`, (n_rows,) int64, read-only: range(n_rows) shuffled by a Random seeded
    from (seed, epoch). Built once per epoch: about 1 s of host time at 1.6M rows, 8 bytes a row."""
    perm = list(range(n_rows))
    random.Random(dist.derive_seed(seed, "sft-order", epoch)).shuffle(perm)
    order = np.asarray(perm, dtype=np.int64)
    order.flags.writeable = False  # shared by every step of the epoch
    return order


def sft_loss(model, micro: list[dict], d: dist.Dist, chunk: int, packed: bool = False) -> float:
    """Forward + backward over this rank's micro-batches: each one's summed NLL over the assistant-token count
    of the global batch (all ranks; FSDP2 sums the ranks' gradients), so the gradient is that of the global
    token mean. Returns that mean loss (a float)."""
    n_tokens = sum(int((b["labels"][:, 1:] != batches.IGNORE_INDEX).sum()) for b in micro)
    total_tokens = max(1.0, dist.all_reduce_sum(n_tokens, d.device).item())
    loss_sum = 0.0
    for b in micro:
        logp, _ = logprobs.batch_logprobs(model, b, d.device, chunk, packed=packed)  # (B, T-1)
        mask = b["labels"][:, 1:].to(d.device) != batches.IGNORE_INDEX
        nll = -(logp * mask).sum()  # summed over this micro-batch's assistant tokens
        (nll / total_tokens).backward()  # global token mean: ranks' grads SUM (modeling.shard_model)
        loss_sum += nll.item()
    return dist.all_reduce_sum(loss_sum, d.device).item() / total_tokens


@torch.no_grad()
def val_loss(model, processor, rows: list[dict], cfg: SFTConfig, d: dist.Dist) -> float:
    """Token-mean NLL of the assistant tokens of `rows` (sharded over ranks; the door left out any
    row --max-length would spoil)."""
    model.eval()
    nll, count = 0.0, 0
    mine, n_real = dist.shard(rows, d)
    micro = batches.sft_micro_batches(  # fixed count, in order: micro-batch j holds rows j*size ...
        processor, mine, cfg.min_pixels, cfg.max_pixels, cfg.max_length, 0, cfg.micro_batch_size, d
    )
    for j, b in enumerate(micro):
        s = j * cfg.micro_batch_size
        logp, _ = logprobs.batch_logprobs(model, b, d.device, cfg.logprob_chunk, packed=cfg.pack)
        mask = (b["labels"][:, 1:].to(d.device) != batches.IGNORE_INDEX).float()
        mask[max(0, n_real - s) :] = 0  # padding rows do not count
        nll += -(logp * mask).sum().item()
        count += int(mask.sum())
    model.train()
    return dist.all_reduce_sum(nll, d.device).item() / max(1, dist.all_reduce_sum(count, d.device).item())


# A new run length also re-shapes the cosine schedule.
RESUME_MAY_CHANGE = config.RESUME_MAY_CHANGE | {"epochs", "eval_every", "acc_data", "acc_limit", "acc_max_new_tokens"}


def validate_config(cfg: SFTConfig) -> None:
    """Stops with one `error:` line per combination of settings that would run but train nothing
    useful, saying what to use (each value's own bounds were checked by config.parse_config)."""
    problems = []
    if cfg.max_steps == 0 and cfg.epochs <= 0:
        problems.append(
            f"--max-steps {cfg.max_steps} --epochs {cfg.epochs}: no step would run and final/ "
            "would be the untrained model; give --max-steps > 0, or 0 with --epochs > 0"
        )
    problems += cfg.range_problems()
    per_step = (1 if cfg.max_tokens_per_micro_batch else cfg.micro_batch_size) * int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % per_step:
        problems.append(f"--batch-size {cfg.batch_size} must be a multiple of {per_step} (micro-batch x ranks)")
    if problems:
        config.fail(*problems)


def use_toy_defaults(cfg: SFTConfig) -> None:
    """Takes what --model / --data leave out from the toy (--toy NAME, the default toy when neither
    is given): the toy model, its SFT splits (train, val) and its RL val split for the accuracy."""
    if not config.toy_fills_in(cfg):
        return
    toy.ensure_toy(variant=cfg.toy)
    folder = toy.VARIANT_DATA_DIRS[cfg.toy]
    cfg.model = cfg.model or str(toy.TOY_MODEL_DIR)
    if not cfg.data:
        cfg.data = str(folder / "sft") + "@train"
        cfg.val_data = cfg.val_data or str(folder / "sft") + "@val"
        cfg.acc_data = cfg.acc_data or str(folder / "rl") + "@val"
    if cfg.output_dir == SFTConfig.output_dir:
        cfg.output_dir = str(toy.run_dir("sft", cfg.toy).relative_to(toy.ROOT))


def load_data(cfg: SFTConfig, processor, d: dist.Dist) -> tuple[list[dict], list[dict], list[dict], int]:
    """Training rows, validation-loss rows and accuracy (RL-layout) rows through the door (prepare.py:
    fields, text, image headers, a --max-length cut that spoils no row; a bad row is an error or left
    out), and the number of steps of the run."""
    door = prepare.Door("sft", cfg.min_pixels, cfg.max_pixels, cfg.max_length)
    common = dict(skip_bad_rows=cfg.skip_bad_rows)
    train_rows = prepare.prepare_split(cfg.data, door, processor, d, split="train", **common)
    val_rows = []
    if cfg.val_data:
        val_rows = prepare.prepare_split(cfg.val_data, door, processor, d, split="val", limit=cfg.val_limit, **common)
    acc_rows = []
    if cfg.acc_data and cfg.acc_limit >= 0:
        acc_door = prepare.Door("rl", cfg.min_pixels, cfg.max_pixels)  # no prompt limit: HF generate takes any
        acc_rows = prepare.prepare_split(
            cfg.acc_data, acc_door, processor, d, split="val", limit=cfg.acc_limit, **common
        )
    return train_rows, val_rows, acc_rows, cfg.max_steps or math.ceil(cfg.epochs * len(train_rows) / cfg.batch_size)


def load_model_and_optimizer(path: str, cfg: SFTConfig, total_steps: int, d: dist.Dist):
    """Processor, the (FSDP2-sharded) trainable model from `path`, its trainable parameters, AdamW,
    and the warmup + cosine schedule over `total_steps`."""
    processor = modeling.load_processor(path, cfg.min_pixels, cfg.max_pixels)
    model = modeling.load_model(path, d.device, cfg.gradient_checkpointing, trainable=True)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    model = modeling.shard_model(model, d)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = modeling.create_optimizer(params, cfg.lr, cfg.weight_decay, d.device)  # fused on CUDA
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, warmup))
    return processor, model, params, optimizer, scheduler


def main() -> None:
    cfg, d, out_dir = run.setup(SFTConfig, PRESETS, validate_config, use_toy_defaults, "sft")
    check_packing(cfg.model, cfg.pack)  # a family packed rows are not exact for: one line naming --no-pack
    processor = modeling.load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    train_rows, val_rows, acc_rows, total_steps = load_data(cfg, processor, d)  # the door: the loop trusts these

    # --- model, optimizer, schedule (a resumed run takes them from its checkpoint) ---
    r = run.Run(cfg, d, out_dir, "sft", RESUME_MAY_CHANGE, len(train_rows), total_steps)
    processor, model, params, optimizer, scheduler = load_model_and_optimizer(r.policy_path, cfg, total_steps, d)

    def save(folder: Path, step: int) -> None:
        extra = {"scheduler": scheduler.state_dict(), "rows": len(train_rows)}
        checkpoint.save_training_checkpoint(model, processor, optimizer, folder, d, step, cfg, **extra)

    state = r.start(model, optimizer, save)
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
    budget = f"{cfg.max_tokens_per_micro_batch} tokens" if cfg.max_tokens_per_micro_batch else "fixed count"
    r.announce(
        f"{len(train_rows)} rows, {total_steps} steps, batch {cfg.batch_size} over {d.world_size} "
        f"ranks, micro-batches of <= {cfg.micro_batch_size} rows ({budget}), packed={cfg.pack}"
    )

    # --- training loop ---
    model.train()
    for step in (bar := r.steps()):
        t0 = time.time()
        batch, _ = dist.shard(global_batch(step, len(train_rows), cfg.batch_size, cfg.seed), d)  # this rank's part
        rows = [train_rows[i] for i in batch]
        micro = batches.sft_micro_batches(
            processor, rows, cfg.min_pixels, cfg.max_pixels, cfg.max_length, cfg.max_tokens_per_micro_batch,
            cfg.micro_batch_size, d,
        )  # fmt: skip
        loss = sft_loss(model, micro, d, cfg.logprob_chunk, cfg.pack)  # token mean over the global batch
        lr = scheduler.get_last_lr()[0]
        grad_norm = modeling.clip_and_step(params, optimizer, cfg.max_grad_norm)  # no step if non-finite
        r.nonfinite.check(step + 1, loss, grad_norm)  # stops a diverged run before anything is saved
        scheduler.step()
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": lr, "time/step_s": time.time() - t0}
        done = step + 1
        if val_rows and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            metrics["val/loss"] = val_loss(model, processor, val_rows, cfg, d)
        bar.set_postfix(loss=f"{loss:.3f}", **({"val": f"{metrics['val/loss']:.3f}"} if "val/loss" in metrics else {}))
        if r.end_step(done, metrics):  # log; save every N; preemption or --stop-after: stop here
            break

    # --- final: accuracy (the save is the teardown's) ---
    summary = ""
    if acc_rows and r.done == total_steps and not r.stopped:
        engine = rollout.HFEngine(model, processor, d, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        greedy = rollout.Sampling(temperature=0.0, max_new_tokens=cfg.acc_max_new_tokens)
        accuracy = rollout.validation_accuracy(engine, acc_rows, d, greedy, reward_accuracy)
        r.logger.log(total_steps, {"val/accuracy": accuracy})
        summary = f" val/accuracy={accuracy:.4f}"
    r.finish(summary=summary)


def reward_accuracy(texts: list[str], rows: list[dict]) -> list[float]:
    """reward.py's accuracy (0/1) of each response against its row's answer."""
    return [s["accuracy"] for s in reward.score_responses(texts, rows, reward.Scoring())]


if __name__ == "__main__":
    run.main(main)  # an InputError -> one line, exit 1; any exit closes the run (logger, process group)
