"""GRPO on Qwen2.5-VL with rule-based rewards; --vas switches on Variance-Aware Sampling.

    python grpo.py --vas                                      # toy: from runs/toy-sft/final, a few minutes on CPU
    torchrun --nproc_per_node 8 grpo.py --preset paper --vas --model runs/mmr1-7b-sft/final --data MMR1/MMR1-RL
    torchrun --nproc_per_node 2 grpo.py --vas --max-steps 2   # CPU, gloo: what the tests run
    python grpo.py --vas --resume                             # continue from the latest step-N

One step: sample the global prompt batch (uniform, or VAS-mixed) -> n rollouts per prompt ->
format + accuracy rewards -> group-normalised advantages -> clipped surrogate + k3 KL to a frozen
reference, token mean over the global batch -> AdamW -> (VAS) refresh VPS -> log / validate / save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import reward
import rollout
import vas
from common import field
from data import toy


@dataclass
class GRPOConfig:
    """GRPO training of Qwen2.5-VL with optional Variance-Aware Sampling (toy task by default)."""

    model: str = field("", "hub id or local folder of the SFT model (default: runs/toy-sft/final)")
    data: str = field("", "RL rows: hub id, parquet/jsonl file or folder, name@split (default: toy train)")
    val_data: str = field("", "RL rows for validation accuracy (default: toy val split)")
    output_dir: str = field("runs/toy-grpo", "where checkpoints, metrics.jsonl and final/ go")
    preset: str = field("", "'paper' = Table 6 hyper-parameters of the paper", choices=["", "paper", "toy"])
    engine: str = field("auto", "rollout engine: vllm (GPU), hf, or auto", choices=["auto", "hf", "vllm"])
    max_steps: int = field(30, "optimizer steps (0 = --episodes passes over the data)")
    episodes: float = field(1.0, "passes over the prompts when --max-steps is 0")
    train_limit: int = field(0, "use only the first N training prompts (0 = all; the toy uses 512)")
    rollout_batch_size: int = field(16, "prompts per step, all ranks together (paper: 512)")
    group_size: int = field(8, "n: responses sampled per prompt (the GRPO group)")
    temperature: float = field(0.6, "rollout sampling temperature")
    top_p: float = field(1.0, "rollout nucleus sampling")
    max_prompt_length: int = field(2048, "prompt token limit (vLLM context = prompt + response)")
    max_response_length: int = field(64, "response token limit (paper: 4096)")
    micro_batch_size: int = field(
        32, "sequences per forward/backward on one rank: the count with --max-tokens-per-micro-batch 0, else a cap"
    )
    max_tokens_per_micro_batch: int = field(
        4096, "tokens per forward/backward on one rank (0 = fixed --micro-batch-size sequences)"
    )
    pack: bool = field(
        True,
        "padding-free log-prob passes: each micro-batch's sequences packed into one row "
        "(--no-pack: right-padded, for comparison)",
    )
    updates_per_batch: int = field(2, "optimizer steps per rollout batch (> 1 recomputes old log-probs; paper: 1)")
    lr: float = field(1e-4, "AdamW learning rate, constant (paper: 1e-6)")
    weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    clip_low: float = field(0.2, "PPO clip: ratio >= 1 - clip_low")
    clip_high: float = field(0.2, "PPO clip: ratio <= 1 + clip_high")
    kl_coef: float = field(0.01, "weight of the k3 KL to the frozen reference (0 = no reference model)")
    adv_eps: float = field(1e-6, "added to the group std when normalising advantages")
    format_weight: float = field(1.0, "weight of the format reward in the overall reward")
    accuracy_weight: float = field(1.0, "weight of the accuracy reward in the overall reward")
    reward_workers: int = field(2, "reward scoring processes per rank (0 = score in this process, no hard timeout)")
    reward_timeout_s: float = field(5.0, "hard time limit per response in reward scoring, seconds")
    vas: bool = field(False, "Variance-Aware Sampling instead of uniform shuffling")
    vas_online: bool = field(False, "also refresh the VPS of each batch's prompts from its training rollouts")
    vas_mix_ratio: float = field(0.5, "lambda: share of each batch drawn by VPS weight")
    vas_alpha: float = field(0.8, "alpha: weight of OVS in VPS")
    vas_beta: float = field(0.2, "beta: weight of TDS in VPS")
    vas_update_every: int = field(10, "T_update: re-score all prompts every N steps (paper: 56; 0 = never)")
    vas_rollouts: int = field(8, "N: responses per prompt when scoring VPS (paper: 16)")
    vas_tds: str = field("self_bleu", "trajectory diversity measure", choices=["self_bleu", "distinct", "edit"])
    vas_momentum: float = field(0.0, "weights <- m * old + (1 - m) * new at each refresh (paper: 0)")
    val_every: int = field(10, "validation accuracy every N steps (0 = only at the end)")
    val_limit: int = field(200, "validation prompts (0 = all)")
    val_temperature: float = field(0.5, "validation sampling temperature (n = 1)")
    save_every: int = field(10, "checkpoint every N steps (0 = only final)")
    gradient_checkpointing: bool = field(False, "recompute activations in backward to save memory")
    logprob_chunk: int = field(1024, "positions per lm_head chunk in the log-prob pass")
    min_pixels: int = field(3136, "images are resized to at least this many pixels")
    max_pixels: int = field(50176, "images are resized to at most this many pixels")
    gpu_memory_utilization: float = field(0.75, "vLLM's share of GPU memory")
    instruction: str = field(
        "",
        "text put before every problem in the user turn, joined by a space; 'recipe' = the paper's Table 7 RL "
        "prompt (what --preset paper sets; the toy needs none)",
    )
    seed: int = field(0, "seed of the sampler, the rollouts and the init")
    resume: bool = field(False, "continue from the latest <output-dir>/step-N")
    stop_after: int = field(0, "exit after this many steps without the final save, as a preemption would (testing)")
    skip_bad_rows: bool = field(False, "skip and count malformed rows instead of stopping")
    report_to: str = field("", "extra metric sinks, comma-separated: wandb,tensorboard")


PRESETS = {
    # Table 6 of the paper (and its VAS settings): lr 1e-6 constant, KL k3 0.01, clip 0.2/0.2,
    # n 8 at temperature 0.6, 2048/4096 tokens, rollout and actor batch 512, micro-batch 8,
    # images in [7056, 1048576] pixels, 10 episodes, VAS N = 16, lambda 0.5, alpha/beta 0.8/0.2, T 56.
    "paper": dict(
        max_steps=0,
        episodes=10.0,
        rollout_batch_size=512,
        group_size=8,
        temperature=0.6,
        top_p=1.0,
        max_prompt_length=2048,
        max_response_length=4096,
        micro_batch_size=8,
        max_tokens_per_micro_batch=16384,
        updates_per_batch=1,
        lr=1e-6,
        weight_decay=0.01,
        max_grad_norm=1.0,
        clip_low=0.2,
        clip_high=0.2,
        kl_coef=0.01,
        vas_mix_ratio=0.5,
        vas_alpha=0.8,
        vas_beta=0.2,
        vas_update_every=56,
        vas_rollouts=16,
        val_every=20,
        val_limit=0,
        save_every=50,
        gradient_checkpointing=True,
        min_pixels=7056,
        max_pixels=1048576,
        gpu_memory_utilization=0.75,
        reward_workers=8,
        instruction="recipe",
    ),  # fmt: skip
    "toy": {},
}

METRICS = [
    "train/loss", "train/pg_loss", "train/kl", "train/grad_norm", "train/clip_frac", "train/entropy", "train/lr",
    "reward/overall", "reward/accuracy", "reward/format", "reward/std_in_group", "rollout/response_len",
    "rollout/truncated_frac", "vas/zero_var_frac", "vas/vps_mean", "vas/weighted_frac", "time/rollout_s",
    "time/update_s", "time/vas_s", "val/accuracy",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The GRPO math
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages A_i = (r_i - mean_g) / (std_g + eps) within each group of n responses.

    rewards: (G*n,) ordered group by group. Returns (advantages (G*n,), zero_var (G,) bool);
    a group whose rewards are all equal gets advantage 0 (it carries no signal). std is the
    unbiased sample std, as in the common GRPO implementations.
    """
    r = rewards.view(-1, n).double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if n > 1 else torch.zeros_like(mean)
    zero_var = (r.max(1).values - r.min(1).values) == 0
    adv = torch.where(zero_var[:, None], torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.flatten().float(), zero_var


KL_CLAMP = 10.0  # the recipe's bound on the per-token k3 value


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp, clamped
    to [-KL_CLAMP, KL_CLAMP] as the recipe's "low_var_kl" does.

    Unbiased for the KL under samples from pi and >= 0 everywhere (low variance); the clamp stops
    one token whose reference log-prob is far above the policy's (exp(d) ~ 3e8 at d = 20) from
    swamping the batch.
    """
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1, -KL_CLAMP, KL_CLAMP)


def clipped_surrogate(logp, old_logp, adv, clip_low: float, clip_high: float):
    """Per-token PPO loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = pi / pi_old.

    logp, old_logp: (B, T); adv: (B, 1) or (B, T). Returns (loss (B, T), clipped (B, T) bool:
    where the clipped branch is the active, larger one).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def grpo_loss(model, batches: list[dict], cfg: GRPOConfig, d: common.Dist) -> dict[str, float]:
    """Forward + backward over this rank's micro-batches of one update; returns summed stats.

    Loss = sum over response tokens of (surrogate + kl_coef * k3) / (response tokens in the
    GLOBAL batch), the token mean over all ranks and micro-batches; gradients are scaled by
    world size because FSDP2 averages them over ranks.
    """
    local_tokens = sum(float(b["response_mask"].sum()) for b in batches)
    total_tokens = max(1.0, common.all_reduce_sum(local_tokens, d.device).item())
    stats = {"loss": 0.0, "pg": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0}
    for b in batches:
        inputs = {k: v.to(d.device) for k, v in b["inputs"].items()}
        mask = b["response_mask"].to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logp, entropy = common.token_logprobs(model, inputs, cfg.logprob_chunk, True, cfg.temperature, cfg.pack)
        old_logp = b["old_logp"].to(d.device) if b.get("old_logp") is not None else logp.detach()
        pg, clipped = clipped_surrogate(
            logp, old_logp, b["advantages"].to(d.device)[:, None], cfg.clip_low, cfg.clip_high
        )
        kl = k3_kl(logp, b["ref_logp"].to(d.device)) if b.get("ref_logp") is not None else torch.zeros_like(logp)
        per_token = pg + cfg.kl_coef * kl
        loss = (per_token * mask).sum()
        (loss * d.world_size / total_tokens).backward()
        stats["loss"] += loss.item()
        stats["pg"] += (pg * mask).sum().item()
        stats["kl"] += (kl * mask).sum().item()
        stats["clipped"] += (clipped.float() * mask).sum().item()
        stats["entropy"] += (entropy * mask).sum().item()
    return {k: common.all_reduce_sum(v, d.device).item() / total_tokens for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_logprobs(model, batches: list[dict], cfg: GRPOConfig, d: common.Dist) -> list[torch.Tensor]:
    """(B, T-1) log-probs per micro-batch under `model` at the rollout temperature, no gradient
    (old policy or reference)."""
    out = []
    for b in batches:
        inputs = {k: v.to(d.device) for k, v in b["inputs"].items()}
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logp, _ = common.token_logprobs(
                model, inputs, cfg.logprob_chunk, temperature=cfg.temperature, packed=cfg.pack
            )
        out.append(logp.float().cpu())
    return out


def save_refresh(out_dir: Path, step: int, scores: dict[str, np.ndarray]) -> None:
    """Keeps one VPS refresh (pass rate, OVS, TDS, VPS per prompt) for `vas.py plot`."""
    (out_dir / "vas").mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "vas" / f"refresh-{step}.npz", **scores)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> None:
    cfg = common.parse_config(GRPOConfig, PRESETS)
    if not cfg.model and not cfg.data:  # the toy defaults
        sft_model = toy.ROOT / "runs" / "toy-sft" / "final"
        if not (sft_model / "config.json").exists():
            raise SystemExit(f"no toy SFT checkpoint at {sft_model}: run `python sft.py` first")
        toy.ensure_toy()
        cfg.model = str(sft_model)
        cfg.data = str(toy.TOY_DATA_DIR / "rl") + "@train"
        cfg.val_data = cfg.val_data or str(toy.TOY_DATA_DIR / "rl") + "@val"
        cfg.train_limit = cfg.train_limit or 512
    elif not cfg.model or not cfg.data:
        raise SystemExit("give both --model and --data (or neither, for the toy task)")
    d = common.setup_distributed(cfg.seed)
    out_dir = Path(cfg.output_dir)

    # --- data ---
    rows = common.load_rows(cfg.data, "rl", "train", cfg.skip_bad_rows, cfg.train_limit)
    val_rows = common.load_rows(cfg.val_data, "rl", "val", cfg.skip_bad_rows, cfg.val_limit) if cfg.val_data else []
    if cfg.rollout_batch_size % d.world_size:
        raise SystemExit(f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by {d.world_size} ranks")
    total_steps = cfg.max_steps or math.ceil(cfg.episodes * len(rows) / cfg.rollout_batch_size)

    # --- models, engine, optimizer, sampler ---
    ckpt = common.latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and ckpt is None and d.master:
        print(f"[grpo] --resume: no checkpoint in {out_dir}, starting from {cfg.model}")
    policy_path = str(ckpt or cfg.model)
    processor = common.load_processor(policy_path, cfg.min_pixels, cfg.max_pixels)
    model = common.shard_model(common.load_model(policy_path, d.device, cfg.gradient_checkpointing, trainable=True), d)
    ref_model = None
    if cfg.kl_coef > 0:  # frozen reference = the starting model, sharded the same way
        ref_model = common.shard_model(common.load_model(cfg.model, d.device).eval().requires_grad_(False), d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sampler = vas.MixedSampler(len(rows), cfg.rollout_batch_size, cfg.vas_mix_ratio if cfg.vas else 0.0, cfg.seed)
    vps = np.zeros(len(rows))  # raw VPS per prompt (VAS)
    start_step = 0
    if ckpt is not None:
        state = common.load_training_checkpoint(ckpt, model, optimizer, d)
        sampler.load_state_dict(state["sampler"])
        vps = np.asarray(state["vps"])
        start_step = state["step"]
        if d.master:
            print(f"[grpo] resumed from {ckpt} at step {start_step}")
    prompt_format = common.PromptFormat(instruction=common.INSTRUCTIONS.get(cfg.instruction, cfg.instruction))
    engine = rollout.make_engine(
        cfg.engine, model, processor, d, model_path=policy_path, min_pixels=cfg.min_pixels,
        max_pixels=cfg.max_pixels, prompt_format=prompt_format, batch_size=cfg.micro_batch_size * 2,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_prompt_length + cfg.max_response_length,
        weights_version=start_step,  # vLLM starts from policy_path: the weights after start_step steps
    )  # fmt: skip
    logger = common.MetricLogger(out_dir, cfg, d.master, cfg.report_to, resume_from=start_step if ckpt else None)
    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[grpo] {len(rows)} prompts, {total_steps} steps x {cfg.rollout_batch_size} prompts x {cfg.group_size} "
              f"responses, {d.world_size} rank(s), engine {type(engine).__name__}, vas={cfg.vas}")  # fmt: skip
    pool = reward.RewardPool(cfg.reward_workers, cfg.reward_timeout_s) if cfg.reward_workers > 0 else None

    def val_sampling(step: int) -> rollout.Sampling:  # one sample per val prompt at val_temperature
        return rollout.Sampling(
            cfg.val_temperature, 1.0, cfg.max_response_length, seed=common.derive_seed(cfg.seed, "val", step)
        )

    def save(folder: Path, step: int) -> None:
        common.save_training_checkpoint(model, processor, optimizer, folder, d, step, cfg,
                                        sampler=sampler.state_dict(), vps=vps.tolist())  # fmt: skip

    def refresh_vps(step: int) -> dict[str, np.ndarray]:
        """Re-scores every prompt with fresh rollouts (sharded over ranks) and re-weights the sampler."""
        nonlocal vps
        engine.wake(model, version=step)
        seed = common.derive_seed(cfg.seed, "vas", step)
        sampling = rollout.Sampling(cfg.temperature, cfg.top_p, cfg.max_response_length, seed=seed)
        scores = vas.rollout_scores(
            engine, rows, list(range(len(rows))), d, n=cfg.vas_rollouts, sampling=sampling, pool=pool,
            alpha=cfg.vas_alpha, beta=cfg.vas_beta, tds_kind=cfg.vas_tds, prompts_per_call=cfg.micro_batch_size,
            desc=f"vas refresh @{step}",
        )  # fmt: skip
        engine.sleep()
        vps = scores["vps"]
        # VPS -> sampling weights: min-max normalised, optional momentum
        sampler.update_weights(vas.normalise_weights(vps, sampler.weights, cfg.vas_momentum))
        if d.master:
            save_refresh(out_dir, step, scores)
        return scores

    initial_vas_s = 0.0
    if cfg.vas and start_step == 0:  # initial scoring of every prompt before step 1
        t0 = time.time()
        scores = refresh_vps(0)
        initial_vas_s = time.time() - t0
        if d.master:
            print(f"[grpo] initial VPS of {len(rows)} prompts in {initial_vas_s:.0f}s: mean pass rate "
                  f"{scores['pass_rate'].mean():.3f}, zero-variance share {np.mean(scores['ovs'] == 0):.3f}")  # fmt: skip

    if val_rows and cfg.val_every and start_step == 0:  # the starting point of the val curve
        logger.log(0, {"val/accuracy": rollout.accuracy(engine, val_rows, d, val_sampling(0), pool)})

    # --- training loop ---
    model.train()
    bar = tqdm(range(start_step, total_steps), disable=not d.master, desc="grpo", initial=start_step, total=total_steps)
    for step in bar:
        metrics: dict[str, float] = {}
        global_batch = sampler.next_batch()
        local = vas.rank_slice(global_batch, d.rank, d.world_size)
        local_rows = [rows[i] for i in local]

        # --- rollouts ---
        t0 = time.time()
        engine.wake(model, version=step)  # vLLM: wake, load the weights if changed; HF: nothing to do
        seed = common.derive_seed(cfg.seed, "rollout", step)
        sampling = rollout.Sampling(cfg.temperature, cfg.top_p, cfg.max_response_length, seed=seed)
        outs = engine.generate(local_rows, cfg.group_size, sampling)
        engine.sleep()
        metrics["time/rollout_s"] = time.time() - t0

        # --- rewards ---
        scores = rollout.score_rollouts(outs, local_rows, pool, format_weight=cfg.format_weight,
                                        accuracy_weight=cfg.accuracy_weight)  # fmt: skip
        rewards = torch.tensor([s["overall"] for s in scores])

        # --- advantages: group-normalised, zero-variance groups give 0 ---
        advantages, zero_var = group_advantages(rewards, cfg.group_size, cfg.adv_eps)

        # --- sequences, old and reference log-probs ---
        t0 = time.time()
        batches = []  # micro-batches by token budget, as many on every rank (FSDP2's forwards are collectives)
        for idx, inputs, mask in common.rl_micro_batches(
            processor, [local_rows[o.row] for o in outs], [o.token_ids for o in outs], cfg.min_pixels,
            cfg.max_pixels, prompt_format, cfg.max_tokens_per_micro_batch, cfg.micro_batch_size, d,
        ):  # fmt: skip
            batches.append({"inputs": inputs, "response_mask": mask, "advantages": advantages[idx]})
        if ref_model is not None:
            for b, ref in zip(batches, sequence_logprobs(ref_model, batches, cfg, d)):
                b["ref_logp"] = ref

        # --- policy update(s) ---
        for update in range(cfg.updates_per_batch):
            if cfg.updates_per_batch > 1:  # pi_old = the policy that generated, before this batch's updates
                if update == 0:
                    for b, old in zip(batches, sequence_logprobs(model, batches, cfg, d)):
                        b["old_logp"] = old
            stats = grpo_loss(model, batches, cfg, d)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        metrics["time/update_s"] = time.time() - t0

        # --- VAS bookkeeping ---
        t0 = time.time()
        done = step + 1
        if cfg.vas and cfg.vas_online:  # free refresh of this batch's prompts from the training rollouts
            groups: dict[int, tuple[list, list]] = {}
            for o, sc in zip(outs, scores):
                groups.setdefault(local[o.row], ([], []))
                groups[local[o.row]][0].append(o.token_ids)
                groups[local[o.row]][1].append(sc["accuracy"])
            keys = list(groups)
            fresh = vas.score_prompts([groups[k][0] for k in keys], [groups[k][1] for k in keys],
                                      cfg.vas_alpha, cfg.vas_beta, cfg.vas_tds)  # fmt: skip
            for index, value in common.all_gather_list(list(zip(keys, fresh["vps"].tolist())), d):
                vps[index] = value
            sampler.update_weights(vas.normalise_weights(vps, sampler.weights, cfg.vas_momentum))
        if cfg.vas and cfg.vas_update_every and done % cfg.vas_update_every == 0 and done < total_steps:
            refresh_vps(done)
        metrics["time/vas_s"] = time.time() - t0 + (initial_vas_s if step == start_step else 0.0)

        # --- metrics ---
        n_local = float(len(outs))
        sums = common.all_reduce_sum(
            torch.tensor([
                rewards.sum(), sum(s["accuracy"] for s in scores), sum(s["format"] for s in scores),
                rewards.view(-1, cfg.group_size).std(1).nan_to_num(0).sum() if cfg.group_size > 1 else 0.0,
                sum(len(o.token_ids) for o in outs), sum(o.finish_reason == "length" for o in outs),
                zero_var.float().sum(), n_local, n_local / cfg.group_size,
            ], dtype=torch.float64),
            d.device,
        ).tolist()  # fmt: skip
        (r_sum, acc_sum, fmt_sum, std_sum, len_sum, trunc_sum, zero_sum, n_seq, n_groups) = sums
        metrics.update({
            "train/loss": stats["loss"], "train/pg_loss": stats["pg"], "train/kl": stats["kl"],
            "train/grad_norm": float(grad_norm), "train/clip_frac": stats["clipped"], "train/entropy": stats["entropy"],
            "train/lr": optimizer.param_groups[0]["lr"],
            "reward/overall": r_sum / n_seq, "reward/accuracy": acc_sum / n_seq, "reward/format": fmt_sum / n_seq,
            "reward/std_in_group": std_sum / n_groups, "rollout/response_len": len_sum / n_seq,
            "rollout/truncated_frac": trunc_sum / n_seq, "vas/zero_var_frac": zero_sum / n_groups,
            "vas/vps_mean": float(np.mean(vps)) if cfg.vas else 0.0,
            "vas/weighted_frac": sampler.n_weighted / cfg.rollout_batch_size,
        })  # fmt: skip
        if val_rows and ((cfg.val_every and done % cfg.val_every == 0) or done == total_steps):
            engine.wake(model, version=done)
            metrics["val/accuracy"] = rollout.accuracy(engine, val_rows, d, val_sampling(done), pool)
            engine.sleep()
        logger.log(done, metrics)
        bar.set_postfix(acc=f"{metrics['reward/accuracy']:.2f}", zero_var=f"{metrics['vas/zero_var_frac']:.2f}",
                        **({"val": f"{metrics['val/accuracy']:.2f}"} if "val/accuracy" in metrics else {}))  # fmt: skip
        if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
            save(out_dir / f"step-{done}", done)
        if cfg.stop_after and done >= cfg.stop_after:
            if d.master:
                print(f"[grpo] --stop-after {cfg.stop_after}: stopping without the final save")
            break
    else:  # the loop ran to the end (no --stop-after break)
        save(out_dir / "final", total_steps)
        if d.master:
            print(f"[grpo] done: {total_steps} steps, model in {out_dir / 'final'}")
    if pool is not None:
        pool.close()
    if d.master and isinstance(engine, rollout.VLLMEngine):
        print(f"[grpo] vLLM weight pushes: {engine.pushes} (one per new set of weights; repeats skipped)")
    engine.close()  # before the process group goes: vLLM's teardown uses it
    logger.close()
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
