"""GRPO on Qwen2.5-VL with rule-based rewards; --vas switches on Variance-Aware Sampling.

    python grpo.py --vas                                      # toy: from runs/toy-sft/final, a few minutes on CPU
    torchrun --nproc_per_node 8 grpo.py --preset paper --vas --model runs/mmr1-7b-sft/final --data MMR1/MMR1-RL
    torchrun --nproc_per_node 2 grpo.py --vas --max-steps 2   # CPU, gloo: what the tests run
    python grpo.py --vas --resume                             # continue from the latest step-N

SIGTERM or SIGUSR1 (preemption): finish the step, save step-N, exit 0 (docs/checkpoints.md).

One step: sample the global prompt batch (uniform, or VAS-mixed) -> n rollouts per prompt -> format + accuracy
rewards -> group-normalised advantages -> clipped surrogate + k3 KL to a frozen reference, token mean over the
global batch -> AdamW -> (VAS) refresh VPS -> log / validate / save. The GRPO options of verl / TRL (dynamic
sampling, Dr. GRPO, GSPO, overlong handling, TIS) are flags, all off by default and in --preset paper
(docs/grpo.md "Loss variants and overlong handling").

Where this GRPO departs from the textbook, and why (the token mean over the global batch, the unbiased
group std, the clamped k3 KL to a frozen reference, log-probs at the rollout temperature, pi_old): docs/grpo.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import reward
import vas
from data import toy
from mmr1 import batches, benchmarks, chat, checkpoint, config, dist, logprobs, memory, modeling, prepare, rollout, run
from mmr1.config import field
from mmr1.families import check_packing


@dataclass
class GRPOConfig(config.TrainingFlags):
    """GRPO training of Qwen2.5-VL with optional Variance-Aware Sampling (toy task by default)."""

    # --- data ---
    model: str = field("", "hub id or local folder of the SFT model (default: runs/toy-sft/final)")
    data: str = field("", "RL rows: hub id, parquet/jsonl file or folder, name@split (default: toy train)")
    val_data: str = field("", "RL rows for validation accuracy (default: toy val split)")
    val_benchmark: str = field(
        "", "validate on this benchmark: --val-data (its columns) or its hub copy", choices=["", *benchmarks.BENCHMARKS]
    )
    train_limit: int = field(0, "use only the first N training prompts (0 = all; the toy uses 512)", at_least=0)
    instruction: str = field(
        "", "text put before each problem (user turn, joined by a space); 'recipe' = the paper's Table 7 RL prompt"
    )
    preset: str = field("", "'paper' = Table 6 hyper-parameters of the paper", choices=["", "paper"])
    # --- rollouts ---
    engine: str = field(
        "auto", "rollout engine: vllm, hf, or auto (vLLM on a GPU when installed)", choices=["auto", "hf", "vllm"]
    )
    max_steps: int = field(30, "optimizer steps (0 = --episodes passes over the data)", at_least=0)
    episodes: float = field(1.0, "passes over the prompts when --max-steps is 0", at_least=0.0)
    rollout_batch_size: int = field(16, "prompts per step, all ranks together (paper: 512)", at_least=1)
    group_size: int = field(8, "n: responses sampled per prompt (the GRPO group)")
    temperature: float = field(0.6, "rollout sampling temperature (the log-probs use it too)", above=0.0)
    top_p: float = field(
        1.0, "nucleus sampling; below 1 biases the logprob gap and --tis-cap (docs/grpo.md)", above=0.0, at_most=1.0
    )
    max_prompt_length: int = field(2048, "prompt token limit (vLLM context = prompt + response)", at_least=1)
    max_response_length: int = field(64, "response token limit (paper: 4096)", at_least=1)
    dynamic_sampling: bool = field(False, "DAPO: drop groups whose accuracies are all equal, refill from the sampler")
    max_sampling_rounds: int = field(3, "--dynamic-sampling: generation rounds per step at most", at_least=1)
    # --- loss (clip and KL; then the variants of verl / TRL, all off by default and in --preset paper) ---
    clip_low: float = field(0.2, "PPO clip: ratio >= 1 - clip_low", at_least=0.0, at_most=1.0)
    clip_high: float = field(0.2, "PPO clip: ratio <= 1 + clip_high", at_least=0.0)
    kl_coef: float = field(0.01, "weight of the k3 KL to the frozen reference (0 = no reference model)", at_least=0.0)
    adv_eps: float = field(1e-6, "added to the group std when normalising advantages", at_least=0.0)
    adv_norm: str = field(
        "std", "group advantage: std = (r - mean) / (std + eps); none = r - mean (Dr. GRPO)", choices=["std", "none"]
    )
    loss_agg: str = field(
        "token-mean",
        "loss normaliser: token-mean (the batch's response tokens), seq-mean (per response, GRPO), constant (Dr. GRPO)",
        choices=["token-mean", "seq-mean", "constant"],
    )
    ratio_level: str = field(
        "token",
        "importance ratio: token = PPO's per token; sequence = GSPO's per response (GSPO's loss: --loss-agg seq-mean)",
        choices=["token", "sequence"],
    )
    mask_truncated: bool = field(False, "drop responses cut at --max-response-length from the loss and its normaliser")
    tis_cap: float = field(
        0.0, "TIS: each token's policy-gradient term x min(exp(trainer old - engine log-prob), C), detached (0 = off)"
    )
    # --- optimiser ---
    lr: float = field(1e-4, "AdamW learning rate, constant (paper: 1e-6)", above=0.0)
    weight_decay: float = field(0.01, "AdamW weight decay", at_least=0.0)
    updates_per_batch: int = field(
        2, "optimizer steps per rollout batch (> 1 recomputes old log-probs; paper: 1)", at_least=1
    )
    micro_batch_size: int = field(
        32, "sequences per forward/backward on one rank (a cap when --max-tokens-per-micro-batch > 0)", at_least=1
    )
    # --- reward ---
    format_weight: float = field(1.0, "weight of the format reward in the overall reward")
    accuracy_weight: float = field(1.0, "weight of the accuracy reward in the overall reward")
    reward_workers: int = field(2, "reward processes per rank (0 = score in this process, same time limit)", at_least=0)
    reward_timeout_s: float = field(5.0, "hard time limit per response in reward scoring, seconds", above=0.0)
    overlong_buffer: int = field(0, "DAPO: responses longer than --max-response-length - N are penalised (0 = off)")
    overlong_penalty: float = field(1.0, "penalty at --max-response-length, linear from 0 over the --overlong-buffer")
    # --- Variance-Aware Sampling ---
    vas: bool = field(False, "Variance-Aware Sampling instead of uniform shuffling")
    vas_online: bool = field(False, "also refresh the VPS of each batch's prompts from its training rollouts")
    vas_mix_ratio: float = field(0.5, "lambda: share of each batch drawn by VPS weight", at_least=0.0, at_most=1.0)
    vas_alpha: float = field(0.8, "alpha: weight of OVS in VPS", at_least=0.0)
    vas_beta: float = field(0.2, "beta: weight of TDS in VPS", at_least=0.0)
    vas_update_every: int = field(10, "T_update: re-score all prompts every N steps (paper: 56; 0 = never)", at_least=0)
    vas_rollouts: int = field(8, "N: responses per prompt when scoring VPS (paper: 16)", at_least=1)
    vas_tds: str = field("self_bleu", "trajectory diversity measure", choices=["self_bleu", "distinct", "edit"])
    vas_momentum: float = field(
        0.0, "weights <- m * old + (1 - m) * new at each refresh (paper: 0)", at_least=0.0, at_most=1.0
    )
    vas_prompts_per_call: int = field(
        256, "prompts per generation call when re-scoring (each x --vas-rollouts responses)", at_least=1
    )
    # --- validation and saving ---
    val_every: int = field(10, "validation accuracy every N steps (0 = only at the end)", at_least=0)
    val_limit: int = field(200, "validation prompts (0 = all)", at_least=0)
    val_temperature: float = field(0.5, "validation sampling temperature (n = 1)", at_least=0.0)
    output_dir: str = field("runs/toy-grpo", "checkpoints, metrics.jsonl and final/ (toy slip: runs/toy-slip-grpo)")
    toy: str = field(
        "default", toy.VARIANT_HELP + " (supplies whichever of --model / --data is missing)", choices=list(toy.VARIANTS)
    )
    save_every: int = field(10, "checkpoint every N steps (0 = only final)", at_least=0)
    log_rollouts: int = field(
        0, "N rollouts per step (prompt id, text, rewards, advantage) to rollouts.jsonl (0 = off)", at_least=0
    )
    # --- system ---
    seed: int = field(0, "seed of the sampler, the rollouts and the init", at_least=0)
    gpu_memory_utilization: float = field(
        0.0, "vLLM's share of GPU memory (0 = from the memory plan, mmr1/memory.py)", at_least=0.0, at_most=1.0
    )


# fmt: off
PRESETS = {
    # Table 6 of the paper and its VAS settings, the Table 7 RL prompt before every problem (docs/grpo.md)
    "paper": dict(
        max_steps=0, episodes=10.0, rollout_batch_size=512, group_size=8, temperature=0.6, top_p=1.0,
        max_prompt_length=2048, max_response_length=4096, micro_batch_size=8, max_tokens_per_micro_batch=16384,
        updates_per_batch=1, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0, clip_low=0.2, clip_high=0.2, kl_coef=0.01,
        vas_mix_ratio=0.5, vas_alpha=0.8, vas_beta=0.2, vas_update_every=56, vas_rollouts=16,
        val_every=20, val_limit=0, save_every=50, gradient_checkpointing=True,
        min_pixels=7056, max_pixels=1048576, reward_workers=8, instruction="recipe",
    ),
}
# fmt: on


# --- The GRPO math ---


def group_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages A_i = (r_i - mean_g) / (std_g + eps) within each group of n responses, std unbiased.
    rewards: (G*n,) group by group. Returns (advantages (G*n,), zero_var (G,) bool); a group whose
    rewards are all equal gets advantage 0 (it carries no signal)."""
    r = rewards.view(-1, n).double()
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if n > 1 else torch.zeros_like(mean)
    zero_var = (r.max(1).values - r.min(1).values) == 0
    adv = torch.where(zero_var[:, None], torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.flatten().float(), zero_var


def centred_advantages(rewards: torch.Tensor, n: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO advantages A_i = r_i - mean_g (no division by the group std; eps unused), with the
    same shapes and zero_var as group_advantages: a group whose rewards are all equal gets 0."""
    r = rewards.view(-1, n).double()
    zero_var = (r.max(1).values - r.min(1).values) == 0
    return (r - r.mean(1, keepdim=True)).flatten().float(), zero_var


ADVANTAGES = {"std": group_advantages, "none": centred_advantages}  # --adv-norm
KL_CLAMP = 10.0  # the recipe's bound on the per-token k3 value


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = ref_logp - logp, unbiased
    under samples from pi and >= 0; clamped to [-KL_CLAMP, KL_CLAMP] as the recipe's "low_var_kl" does,
    so one token far above the policy (exp(d) ~ 3e8 at d = 20) cannot swamp the batch."""
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1, -KL_CLAMP, KL_CLAMP)


def clipped_surrogate(logp, old_logp, adv, clip_low: float, clip_high: float):
    """Per-token PPO loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = pi / pi_old.
    logp, old_logp: (B, T); adv: (B, 1) or (B, T). Returns (loss (B, T), clipped (B, T) bool:
    where the clipped branch is the active, larger one)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


# --- the variants of the loss: each selected once by its flag (docs/grpo.md "Loss variants") ---


def token_ratio_loss(logp, old_logp, adv, mask, cfg: GRPOConfig):
    """--ratio-level token: PPO's per-token ratio pi / pi_old, clipped per token (clipped_surrogate).
    logp, old_logp, mask: (B, T); adv: (B, 1). Returns (loss (B, T), clipped (B, T) bool)."""
    return clipped_surrogate(logp, old_logp, adv, cfg.clip_low, cfg.clip_high)


def sequence_ratio_loss(logp, old_logp, adv, mask, cfg: GRPOConfig):
    """--ratio-level sequence (GSPO): s_i = exp(mean over response i's tokens of logp - old_logp), clipped
    per response; every token of response i carries the same loss, so grad = s_i x the mean of grad logp
    over its tokens (GSPO's gradient; its GSPO-token form with sg[s_i] equals it). Shapes as above."""
    log_ratio = ((logp - old_logp) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    loss, clipped = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, cfg.clip_low, cfg.clip_high)
    return loss.expand_as(logp), clipped.expand_as(logp)  # (B, T): the response's loss on each of its tokens


RATIO_LOSSES = {"token": token_ratio_loss, "sequence": sequence_ratio_loss}  # --ratio-level


# Each aggregation picks the divisor of the GLOBAL batch (all ranks and micro-batches) and the (B, T)
# per-token weights of a micro-batch: loss = sum(weights(mask) * token loss) / divisor. With the divisor
# global, the micro-batches' losses and FSDP2's sum of the ranks' gradients add up to the one-process
# full-batch loss and gradient.
Weights = Callable[[torch.Tensor], torch.Tensor]


def token_mean(totals: dict[str, float], cfg: GRPOConfig) -> tuple[float, Weights]:
    """--loss-agg token-mean: every response token of the global batch weighs 1 / (its tokens)."""
    return totals["tokens"], lambda mask: mask


def seq_mean(totals: dict[str, float], cfg: GRPOConfig) -> tuple[float, Weights]:
    """--loss-agg seq-mean (original GRPO): the token mean within each response, then the mean over
    the global batch's responses: a token of response i weighs 1 / (|o_i| x responses)."""
    return totals["responses"], lambda mask: mask / mask.sum(1, keepdim=True).clamp(min=1)


def constant_divisor(totals: dict[str, float], cfg: GRPOConfig) -> tuple[float, Weights]:
    """--loss-agg constant (Dr. GRPO): the token sum over a fixed max-response-length x responses,
    so a response's weight does not depend on its length."""
    return cfg.max_response_length * totals["responses"], lambda mask: mask


LOSS_AGGREGATIONS = {"token-mean": token_mean, "seq-mean": seq_mean, "constant": constant_divisor}


def global_totals(micro: list[dict], d: dist.Dist) -> dict[str, float]:
    """Response tokens and responses of the GLOBAL batch (all ranks), each at least 1; a response
    masked out entirely (filler, --mask-truncated) does not count."""
    local = {
        "tokens": sum(float(b["response_mask"].sum()) for b in micro),
        "responses": sum(float((b["response_mask"].sum(1) > 0).sum()) for b in micro),
    }
    return {k: max(1.0, v) for k, v in dist.all_reduce_dict(local, d.device).items()}


# --- the rollout-trainer gap: the engine sampled with its own numerics, the trainer scores with its own ---


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS): per-token min(pi_old / pi_engine, cap), detached, (B, T):
    corrects for the rollouts having been sampled by the engine's numerics, not the trainer's."""
    return torch.clamp(torch.exp(old_logp - engine_logp), max=cap).detach()


class RolloutGap:
    """The rollout-trainer log-prob gap of one update, fed once per micro-batch: over the engine's
    response tokens, the sums of |d| and of k3 = exp(d) - d - 1 (KL(engine || trainer)), d = trainer
    old - engine log-prob, the max |d| and the token count; and each micro-batch's TIS weights."""

    def __init__(self, cfg: GRPOConfig, device: torch.device):
        self.cap, self.device = cfg.tis_cap, device
        self.weights = tis_weights if cfg.tis_cap > 0 else lambda *_: 1.0  # no --tis-cap: weight 1, exactly
        self.sums = {"tokens": 0.0, "abs_diff": 0.0, "k3": 0.0}
        self.abs_diff_max = 0.0

    def add(self, b: dict, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | float:
        """Adds micro-batch b's gap; returns the factor of its (B, T-1) policy-gradient terms: the TIS
        weights (1 where the engine gave no log-prob: none in a hand-built micro-batch), or 1.0."""
        engine_mask = b.get("engine_mask", torch.zeros_like(mask)).to(self.device)  # (B, T-1)
        engine_logp = torch.where(engine_mask > 0, b.get("engine_logp", old_logp).to(self.device), old_logp.detach())
        diff = (old_logp - engine_logp).detach() * engine_mask  # (B, T-1), 0 off the engine's tokens
        self.sums["tokens"] += float(engine_mask.sum())
        self.sums["abs_diff"] += float(diff.abs().sum())
        self.sums["k3"] += float(((torch.exp(diff) - diff - 1) * engine_mask).sum())
        self.abs_diff_max = max(self.abs_diff_max, float(diff.abs().max()) if diff.numel() else 0.0)
        return self.weights(old_logp, engine_logp, self.cap)

    def metrics(self, d: dist.Dist) -> dict[str, float]:
        """gap_abs_diff and gap_k3 (means over the global batch's engine tokens), gap_abs_diff_max."""
        gap_max = max(dist.all_gather_list([self.abs_diff_max], d))
        sums = dist.all_reduce_dict(self.sums, d.device)
        tokens = max(1.0, sums["tokens"])
        return {"gap_abs_diff": sums["abs_diff"] / tokens, "gap_k3": sums["k3"] / tokens, "gap_abs_diff_max": gap_max}


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment of a response of `length` tokens: 0 up to max_length - buffer,
    then falling linearly to -penalty at max_length (0 when buffer is 0: off)."""
    start = max_length - buffer
    return -penalty * (length - start) / buffer if buffer > 0 and length > start else 0.0


def policy_loss_backward(model, micro: list[dict], cfg: GRPOConfig, d: dist.Dist) -> dict[str, float]:
    """Forward + backward of the GRPO loss sum(weight x (surrogate + kl_coef * k3)) / divisor over this
    rank's micro-batches (one update; weight and divisor from --loss-agg); returns the loss as aggregated,
    the global token means of pg, kl, clipped and entropy, and the gap (RolloutGap.metrics)."""
    ratio_loss, totals = RATIO_LOSSES[cfg.ratio_level], global_totals(micro, d)
    divisor, weights = LOSS_AGGREGATIONS[cfg.loss_agg](totals, cfg)  # one global divisor for every micro-batch
    gap, sums = RolloutGap(cfg, d.device), dict.fromkeys(("loss", "pg", "kl", "clipped", "entropy"), 0.0)
    for b in micro:
        mask = b["response_mask"].to(d.device)  # (B, T-1), 1 on response tokens
        logp, entropy = logprobs.batch_logprobs(
            model, b["inputs"], d.device, cfg.logprob_chunk, True, cfg.temperature, cfg.pack
        )
        old_logp = b["old_logp"].to(d.device) if "old_logp" in b else logp.detach()  # (B, T-1); see the docstring
        adv = b["advantages"].to(d.device)[:, None]  # (B, 1): one advantage per response, every token
        pg, clipped = ratio_loss(logp, old_logp, adv, mask, cfg)  # (B, T-1) each
        pg = pg * gap.add(b, old_logp, mask)  # x TIS weights (1 without --tis-cap); counts the gap
        kl = k3_kl(logp, b["ref_logp"].to(d.device)) if "ref_logp" in b else torch.zeros_like(logp)  # (B, T-1)
        loss = ((pg + cfg.kl_coef * kl) * weights(mask)).sum()  # this micro-batch's weighted token sum
        (loss / divisor).backward()  # the global normaliser: ranks' grads SUM (modeling.shard_model), not average
        for name, value in (("loss", loss), ("pg", pg), ("kl", kl), ("clipped", clipped.float()), ("entropy", entropy)):
            sums[name] += float((value if name == "loss" else value * mask).detach().sum())
    # the loss as aggregated; the other stats are token means over the global batch whatever --loss-agg
    sums = dist.all_reduce_dict(sums, d.device)
    return {k: v / (divisor if k == "loss" else totals["tokens"]) for k, v in sums.items()} | gap.metrics(d)


@torch.no_grad()
def frozen_token_logprobs(model, micro: list[dict], cfg: GRPOConfig, d: dist.Dist) -> list[torch.Tensor]:
    """Per-token log-probs (B, T-1) of each micro-batch at the rollout temperature, without
    gradient, on the CPU: those of the reference model, or of the old policy."""
    args = (d.device, cfg.logprob_chunk, False, cfg.temperature, cfg.pack)  # False: no entropy
    return [logprobs.batch_logprobs(model, b["inputs"], *args)[0].float().cpu() for b in micro]


# --- The phases of one step ---


@dataclass
class Group:
    """One prompt's n scored responses: its index in the data, row, built prompt, rollouts, rewards."""

    prompt_id: int
    row: dict
    prompt: batches.Prompt
    outs: list[rollout.Rollout]
    rewards: list[dict]


def has_signal(group: Group) -> bool:
    """DAPO's filter: the group's accuracies are not all equal. On the 0/1 accuracy, not the shaped
    overall reward (a format or overlong difference alone is no signal about the answer)."""
    accuracies = [r["accuracy"] for r in group.rewards]
    return max(accuracies) > min(accuracies)


@dataclass
class StepBatch:
    """What one step trains on, on this rank, and what it sampled to get it. rows / prompts / prompt_ids:
    one per group; outs / rewards: n per group, row-major (Rollout.row indexes rows); trained: (len(outs),)
    bool, False on a filler group's responses (dynamic sampling out of rounds: equal shapes on every rank,
    no weight in the loss); sampled: every group generated this step, all rounds; rounds: rounds run."""

    rows: list[dict]
    prompts: list[batches.Prompt]
    prompt_ids: list[int]
    outs: list[rollout.Rollout]
    rewards: list[dict]
    trained: torch.Tensor
    sampled: list[Group]
    rounds: int

    @classmethod
    def of(cls, kept: list[Group], fillers: list[Group], sampled: list[Group], rounds: int) -> StepBatch:
        """The batch of the `kept` groups (trained) and the `fillers` (weightless), in that order."""
        groups = kept + fillers
        outs = [dataclasses.replace(o, row=g) for g, group in enumerate(groups) for o in group.outs]
        trained = torch.tensor([g < len(kept) for g, group in enumerate(groups) for _ in group.outs])
        rewards = [r for g in groups for r in g.rewards]
        return cls([g.row for g in groups], [g.prompt for g in groups], [g.prompt_id for g in groups], outs,
                   rewards, trained, sampled, rounds)  # fmt: skip


def generation_round(engine, sampler: vas.MixedSampler, rows: list[dict], processor, fmt: chat.PromptFormat, pool,
                     cfg: GRPOConfig, d: dist.Dist, step: int, round_: int) -> list[Group]:  # fmt: skip
    """One generation round: the sampler's next global batch, this rank's slice of it, n rollouts per
    prompt (seeded by step and round) and their rewards; one Group per prompt, in batch order."""
    prompt_ids, _ = dist.shard(sampler.next_batch(), d)  # this rank's slice of the global batch
    part, n = [rows[i] for i in prompt_ids], cfg.group_size
    prompts = batches.build_prompts(processor, part, fmt, cfg.min_pixels, cfg.max_pixels)
    seed = dist.derive_seed(cfg.seed, "rollout", step, *([round_] if round_ else []))
    sampling = rollout.Sampling(cfg.temperature, cfg.top_p, cfg.max_response_length, seed, logprobs=True)
    outs = engine.generate(part, n, sampling, prompts)  # n per prompt, row-major
    rewards = score(outs, part, pool, cfg)  # format + accuracy of each response, reward.py
    return [
        Group(i, part[g], prompts[g], outs[g * n : (g + 1) * n], rewards[g * n : (g + 1) * n])
        for g, i in enumerate(prompt_ids)
    ]


# --- the sampling variants: each wraps generation_round, selected once by its flag ---


def one_round(generate: Callable[[int], list[Group]], cfg: GRPOConfig, d: dist.Dist) -> StepBatch:
    """Without --dynamic-sampling: one round, every group trained."""
    groups = generate(0)
    return StepBatch.of(groups, [], groups, rounds=1)


def dynamic_rounds(generate: Callable[[int], list[Group]], cfg: GRPOConfig, d: dist.Dist) -> StepBatch:
    """--dynamic-sampling (DAPO): groups without accuracy variance are dropped and further rounds generated
    (each a fresh global batch from the same sampler, seeded apart) until every rank holds its share of
    --rollout-batch-size groups with signal, or --max-sampling-rounds (one all-reduce a round: the same rounds
    on all ranks). A share still short is filled with weightless dropped groups (`trained` False)."""
    share, kept, dropped, sampled = cfg.rollout_batch_size // d.world_size, [], [], []
    for round_ in range(cfg.max_sampling_rounds):
        for group in generate(round_):
            sampled.append(group)
            (kept if has_signal(group) else dropped).append(group)
        if int(dist.all_reduce_sum(min(len(kept), share), d.device)) == cfg.rollout_batch_size:
            break  # every rank's share is full (all ranks see the same sum: the same rounds everywhere)
    kept = kept[:share]  # a share over-full after the last round: the rest is dropped (its tokens counted)
    return StepBatch.of(kept, dropped[: share - len(kept)], sampled, rounds=round_ + 1)


SAMPLING = {False: one_round, True: dynamic_rounds}  # --dynamic-sampling


def sample_batch(engine, model, sampler: vas.MixedSampler, rows: list[dict], processor, fmt: chat.PromptFormat, pool,
                 cfg: GRPOConfig, d: dist.Dist, step: int) -> StepBatch:  # fmt: skip
    """This rank's share of the step's global batch from the sampler, n rollouts per prompt from the
    policy after `step` updates, scored: generation rounds as --dynamic-sampling selects (SAMPLING)."""
    engine.push_weights(model, version=step)  # the new policy -> the inference engine (vLLM: skipped if unchanged)
    generate = functools.partial(generation_round, engine, sampler, rows, processor, fmt, pool, cfg, d, step)
    batch = SAMPLING[cfg.dynamic_sampling](generate, cfg, d)
    engine.sleep()
    return batch


def scoring(cfg: GRPOConfig) -> reward.Scoring:
    """The run's one reward.Scoring: training rewards, validation and VAS scoring all score under it."""
    return reward.Scoring(format_weight=cfg.format_weight, accuracy_weight=cfg.accuracy_weight)


def score(outs: list[rollout.Rollout], rows: list[dict], pool, cfg: GRPOConfig) -> list[dict]:
    """reward.py's format, accuracy and overall reward of each rollout against its prompt's row, plus
    DAPO's overlong term (0 unless --overlong-buffer), added to the overall reward."""
    texts, prompt_rows = [o.text for o in outs], [rows[o.row] for o in outs]
    scored = reward.score_responses(texts, prompt_rows, scoring(cfg), pool=pool, timeout_s=cfg.reward_timeout_s)
    for o, r in zip(outs, scored):  # DAPO's overlong term: in the overall reward, never in the 0/1 accuracy
        r["overlong"] = overlong_penalty(
            len(o.token_ids), cfg.max_response_length, cfg.overlong_buffer, cfg.overlong_penalty
        )
        r["overall"] += r["overlong"]
    return scored


def micro_batches(processor, outs: list[rollout.Rollout], prompts: list[batches.Prompt], advantages: torch.Tensor,
                  cfg: GRPOConfig, d: dist.Dist, trained: torch.Tensor | None = None) -> list[dict]:  # fmt: skip
    """Prompt + response sequences grouped by token budget, as many micro-batches on every rank (FSDP2's
    forwards are collectives): model inputs, the (B, T-1) response-token mask and the (B,) advantages of each.
    prompts[g]: the Prompt group g was generated from (outs[i].row = g). A response whose `trained` entry is
    False ((B*n,) bool; default all True), or cut under --mask-truncated, gets an all-zero mask."""
    paired, tokens = [prompts[o.row] for o in outs], [o.token_ids for o in outs]  # each response beside its prompt
    planned = batches.rl_micro_batches(
        processor, paired, tokens, cfg.max_tokens_per_micro_batch, cfg.micro_batch_size, d
    )
    keep = torch.tensor([not (cfg.mask_truncated and o.finish_reason == "length") for o in outs])  # (B*n,)
    keep = keep if trained is None else keep & trained
    return [
        {"inputs": inputs, "response_mask": mask * keep[idx, None], "advantages": advantages[idx]}
        | engine_logprobs([outs[i] for i in idx], mask)
        for idx, inputs, mask in planned
    ]


def engine_logprobs(outs: list[rollout.Rollout], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The engine's log-probs of a micro-batch's sampled tokens laid on its (B, T-1) response mask
    (engine_logp), and engine_mask: 1 on the response tokens of the rollouts that carry them."""
    has = torch.tensor([o.logprobs is not None for o in outs])  # (B,)
    engine_mask = mask * has[:, None]
    grid = torch.zeros(mask.shape, dtype=torch.float32)
    values = [v for o in outs if o.logprobs is not None for v in o.logprobs]
    grid[engine_mask > 0] = torch.tensor(values, dtype=torch.float32)  # row-major: each row's tokens in order
    return {"engine_logp": grid, "engine_mask": engine_mask}


def update_policy(model, ref_model, optimizer, micro: list[dict], cfg: GRPOConfig, d: dist.Dist):
    """Reference (and, with several updates, old-policy) log-probs, then `updates_per_batch`
    optimizer steps on the batch. Returns (stats of the last update, its gradient norm)."""
    if ref_model is not None:
        for b, ref in zip(micro, frozen_token_logprobs(ref_model, micro, cfg, d)):
            b["ref_logp"] = ref
        if d.enabled:  # its root (embeddings + lm_head, 2 GiB bf16 at 7B) stays gathered after a forward
            ref_model.reshard()
    if cfg.updates_per_batch > 1:  # pi_old = the policy that generated, before this batch's updates
        for b, old in zip(micro, frozen_token_logprobs(model, micro, cfg, d)):
            b["old_logp"] = old
    for _ in range(cfg.updates_per_batch):
        stats = policy_loss_backward(model, micro, cfg, d)
        grad_norm = modeling.clip_and_step(model.parameters(), optimizer, cfg.max_grad_norm)
        if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
            break  # no step was taken; the NonFiniteGuard in main stops or skips
    return stats, grad_norm


def refresh_vps(engine, model, rows: list[dict], state: SamplerState, cfg: GRPOConfig, d: dist.Dist, pool,
                step: int, out_dir: Path) -> dict[str, np.ndarray]:  # fmt: skip
    """Re-scores every prompt with N fresh rollouts after `step` updates (vas.rollout_scores: rounds, ranks,
    seeds): the VPS kept in `state` and the sampler re-weighted by its min-max normalised values, the responses
    and tokens added to the generation budget, the refresh kept for `vas.py plot`. Returns the scores, (P,) each."""
    engine.push_weights(model, version=step)
    sampling = rollout.Sampling(cfg.temperature, cfg.top_p, cfg.max_response_length)
    scores = vas.rollout_scores(
        engine, rows, d, n=cfg.vas_rollouts, sampling=sampling, seed=cfg.seed, step=step, pool=pool,
        scoring=scoring(cfg), alpha=cfg.vas_alpha, beta=cfg.vas_beta, tds_kind=cfg.vas_tds,
        prompts_per_call=cfg.vas_prompts_per_call, desc=f"vas refresh @{step}",
    )  # fmt: skip
    engine.sleep()
    state.vps = scores["vps"]
    state.sampler.update_weights(vas.normalise_weights(state.vps, state.sampler.weights, cfg.vas_momentum))
    state.add_generated(len(rows) * cfg.vas_rollouts, scores["tokens"].sum())
    if d.master:
        (out_dir / "vas").mkdir(parents=True, exist_ok=True)
        with config.atomic_file(out_dir / "vas" / f"refresh-{step}.npz", "wb") as f:  # whole or absent
            np.savez(f, **scores)
    return scores


def refresh_vps_online(vps: np.ndarray, sampler: vas.MixedSampler, groups: list[Group], cfg: GRPOConfig,
                       d: dist.Dist) -> None:  # fmt: skip
    """--vas-online: the VPS of the prompts of `groups` (every group the step sampled, dropped ones
    too) from their training rollouts (no extra generation), gathered over ranks into `vps` (P,),
    then the sampler re-weighted. A prompt sampled twice in a step is scored on all its responses."""
    merged: dict[int, tuple[list, list]] = {}
    for group in groups:
        tokens, accuracies = merged.setdefault(group.prompt_id, ([], []))
        tokens += [o.token_ids for o in group.outs]
        accuracies += [r["accuracy"] for r in group.rewards]
    keys = list(merged)
    fresh = vas.score_prompts(
        [merged[k][0] for k in keys], [merged[k][1] for k in keys], cfg.vas_alpha, cfg.vas_beta, cfg.vas_tds
    )
    for index, value in dist.all_gather_list(list(zip(keys, fresh["vps"].tolist())), d):
        vps[index] = value
    sampler.update_weights(vas.normalise_weights(vps, sampler.weights, cfg.vas_momentum))


def vas_phase(engine, model, rows, batch: StepBatch, state: SamplerState, cfg: GRPOConfig, d, pool, done: int,
              total: int, out_dir) -> None:  # fmt: skip
    """VAS after `done` of `total` updates: --vas-online re-scores the step's prompts from its rollouts
    (dropped groups too); every --vas-update-every steps but the last, every prompt gets fresh ones."""
    if cfg.vas and cfg.vas_online:
        refresh_vps_online(state.vps, state.sampler, batch.sampled, cfg, d)
    if cfg.vas and cfg.vas_update_every and done % cfg.vas_update_every == 0 and done < total:
        refresh_vps(engine, model, rows, state, cfg, d, pool, done, out_dir)


# --- Bookkeeping: what the loop carries from step to step, and one step's metrics ---


@dataclass
class SamplerState:
    """What prompt sampling carries from step to step, saved in every checkpoint: the mixed sampler,
    the raw VPS of every prompt ((P,), VAS) and the generation budget: responses and response tokens
    generated for training rollouts (refills included) and VAS scoring, not validation (rollout/generated_*)."""

    sampler: vas.MixedSampler
    vps: np.ndarray
    responses: float = 0.0
    tokens: float = 0.0

    def add_generated(self, responses: float, tokens: float) -> None:
        """Adds to the generation budget."""
        self.responses, self.tokens = self.responses + float(responses), self.tokens + float(tokens)

    def state_dict(self) -> dict:
        """The checkpoint's sampler, vps, rows (P, checked on resume) and generated [responses, tokens]."""
        return {"sampler": self.sampler.state_dict(), "vps": self.vps.tolist(), "rows": len(self.vps),
                "generated": [self.responses, self.tokens]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() captured."""
        self.sampler.load_state_dict(state["sampler"])
        self.vps, (self.responses, self.tokens) = np.asarray(state["vps"]), state["generated"]


class PhaseClock:
    """Wall-clock seconds of one step's phases (time/<phase>_s): lap(phase) books the seconds since the
    clock started or the last lap to `phase`; `seconds` may start with time spent before the step."""

    def __init__(self, **seconds: float):
        self.seconds, self.last = dict(seconds), time.time()

    def lap(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


NO_SIGNAL_STEPS = 3  # steps with no group with signal, from this process's first step, before the run says so


class NoSignalWatch:
    """Says once when every group of the first NO_SIGNAL_STEPS steps had equal rewards (vas/zero_var_frac
    1.0: advantages, loss and gradient all 0); one step with a group with signal silences it for the run."""

    def __init__(self, steps: int = NO_SIGNAL_STEPS):
        self.steps, self.accuracies = steps, []  # the dead steps' reward/accuracy; None once a step had signal

    def update(self, metrics: dict[str, float], cfg: GRPOConfig) -> str | None:
        """Reads one step's metrics; returns the one-line diagnosis at the step that completes the count."""
        if self.accuracies is None or metrics["vas/zero_var_frac"] < 1.0:
            self.accuracies = None
            return None
        self.accuracies.append(metrics["reward/accuracy"])
        if len(self.accuracies) != self.steps:
            return None
        return (
            f"no signal: in each of the first {self.steps} steps every group's {cfg.group_size} rewards were equal "
            f"(vas/zero_var_frac 1.0, mean accuracy {np.mean(self.accuracies):.2f}): nothing trains. The start model "
            f"is too weak (accuracy near 0) or too strong (near 1) for the data, or --group-size {cfg.group_size} "
            "is too small to hold both outcomes. Try a start model matched to the data (--model, e.g. after sft.py) "
            "or other --data, a larger --group-size, a higher --temperature, a longer --max-response-length if "
            "responses are cut (rollout/truncated_frac), --dynamic-sampling or --vas"
        )


# The update's stats (policy_loss_backward's, and the gradient norm) -> their metric names
STAT_METRICS = {
    "loss": "train/loss", "pg": "train/pg_loss", "kl": "train/kl", "grad_norm": "train/grad_norm",
    "clipped": "train/clip_frac", "entropy": "train/entropy", "gap_abs_diff": "rollout/logprob_abs_diff",
    "gap_k3": "rollout/mismatch_k3", "gap_abs_diff_max": "rollout/logprob_abs_diff_max",
}  # fmt: skip


def batch_metrics(batch: StepBatch, zero_var: torch.Tensor, stats: dict[str, float], grad_norm: float, cfg: GRPOConfig,
                  d: dist.Dist) -> dict[str, float]:  # fmt: skip
    """The train/ (but lr), reward/, rollout/ and vas/zero_var_frac metrics of one step, averaged over all
    ranks: of the trained batch (a filler group counts as zero-variance), and (`_sampled`, rounds, generated
    responses and tokens) of everything this step sampled, dropped groups and refills included."""
    outs, rewards, n = batch.outs, batch.rewards, cfg.group_size
    overall = torch.tensor([r["overall"] for r in rewards], dtype=torch.float64)
    per_sequence = {
        "reward/overall": overall.sum(),
        "reward/accuracy": sum(r["accuracy"] for r in rewards),
        "reward/format": sum(r["format"] for r in rewards),
        "rollout/response_len": sum(len(o.token_ids) for o in outs),
        "rollout/truncated_frac": sum(o.finish_reason == "length" for o in outs),
        "reward/overlong": sum(r["overlong"] for r in rewards),
    }
    per_group = {
        "reward/std_in_group": overall.view(-1, n).std(1).sum(),
        "vas/zero_var_frac": (zero_var | ~batch.trained.view(-1, n)[:, 0]).sum(),
    }
    sampled = {  # everything generated this step, over all rounds
        "rollout/sampled_responses": n * len(batch.sampled),
        "rollout/sampled_tokens": sum(len(o.token_ids) for g in batch.sampled for o in g.outs),
        "sampled_accuracy": sum(r["accuracy"] for g in batch.sampled for r in g.rewards),
        "sampled_zero_var": sum(not has_signal(g) for g in batch.sampled),
        "trained_groups": int(batch.trained.sum()) // n,
    }
    sums = dist.all_reduce_dict({**per_sequence, **per_group, **sampled, "sequences": len(outs)}, d.device)
    sequences, groups = sums["sequences"], sums["sequences"] / n
    update = stats | {"grad_norm": grad_norm}
    train = {name: update[key] for key, name in STAT_METRICS.items()} | {
        "rollout/sampled_responses": sums["rollout/sampled_responses"],
        "rollout/sampled_tokens": sums["rollout/sampled_tokens"],
        "reward/accuracy_sampled": sums["sampled_accuracy"] / sums["rollout/sampled_responses"],
        "rollout/zero_var_frac_sampled": sums["sampled_zero_var"] * n / sums["rollout/sampled_responses"],
        "rollout/sampling_rounds": batch.rounds,
        "rollout/trained_frac": sums["trained_groups"] / cfg.rollout_batch_size,
    }
    return train | {k: sums[k] / (sequences if k in per_sequence else groups) for k in per_sequence | per_group}


def perf_metrics(model_config, batch: StepBatch, t_rollout: float, t_update: float, engine, cfg: GRPOConfig,
                 d: dist.Dist) -> dict[str, float]:  # fmt: skip
    """Throughput of the step, all ranks together (docs/grpo.md "Throughput and MFU"): generated tokens per
    rollout second, trained prompt + response tokens per update second; on CUDA with a known peak also
    perf/mfu (mmr1.perf.step_flops of both phases over their seconds x ranks x peak) and perf/mfu_update."""
    from mmr1 import perf

    lengths = [len(batch.prompts[o.row].ids) + len(o.token_ids) for o in batch.outs]  # every sequence forwarded
    generated = [(len(g.prompt.ids), len(o.token_ids)) for g in batch.sampled for o in g.outs]
    prefill = [len(g.prompt.ids) for g in batch.sampled] if engine.shares_prefill else None
    passes = int(cfg.kl_coef > 0) + int(cfg.updates_per_batch > 1)  # the reference, the old policy
    flops = perf.step_flops(model_config, lengths, generated, passes, prefill, cfg.updates_per_batch)
    local = {"tokens": sum(lengths), "generated": sum(n for _, n in generated), **flops}
    sums = dist.all_reduce_dict(local, d.device)
    out = {
        "perf/rollout_tokens_per_s": sums["generated"] / t_rollout,
        "perf/update_tokens_per_s": sums["tokens"] / t_update,
    }
    peak = perf.peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    if peak:
        out["perf/mfu"] = perf.mfu(sums["update"] + sums["rollout"], t_rollout + t_update, d.world_size, peak)
        out["perf/mfu_update"] = perf.mfu(sums["update"], t_update, d.world_size, peak)
    return out


def step_metrics(batch: StepBatch, zero_var: torch.Tensor, update: tuple[dict[str, float], float],
                 clock: PhaseClock, state: SamplerState, optimizer, model, engine, cfg: GRPOConfig,
                 d: dist.Dist) -> dict[str, float]:  # fmt: skip
    """Every metric of one step but val/accuracy (docs/grpo.md "Metrics"): batch_metrics of the update's
    (stats, grad norm), perf_metrics, lr, the VAS state, the phases' seconds and the generation budget,
    to which this step's sampled responses and tokens (refills included) are added first."""
    metrics = batch_metrics(batch, zero_var, *update, cfg, d)
    metrics |= perf_metrics(model.config, batch, clock.seconds["rollout"], clock.seconds["update"], engine, cfg, d)
    state.add_generated(metrics["rollout/sampled_responses"], metrics["rollout/sampled_tokens"])
    return metrics | {
        "train/lr": optimizer.param_groups[0]["lr"],
        "vas/vps_mean": float(np.mean(state.vps)) if cfg.vas else 0.0,
        "vas/weighted_frac": state.sampler.n_weighted / cfg.rollout_batch_size,
        **{f"time/{phase}_s": seconds for phase, seconds in clock.seconds.items()},  # rollout, update, vas
        "rollout/generated_responses": state.responses,
        "rollout/generated_tokens": state.tokens,
    }


def rollout_records(batch: StepBatch, advantages: torch.Tensor, cfg: GRPOConfig, d: dist.Dist, step: int) -> list[dict]:
    """--log-rollouts N: N of the step's trained-batch responses, drawn at random (seeded by the step)
    from all ranks: prompt id, response text, rewards, advantage, finish reason, whether it trained."""
    rng = np.random.default_rng(dist.derive_seed(cfg.seed, "log-rollouts", step, d.rank))
    mine = sorted(rng.choice(len(batch.outs), min(cfg.log_rollouts, len(batch.outs)), replace=False).tolist())
    records = [
        {"prompt_id": batch.prompt_ids[batch.outs[i].row], "response": batch.outs[i].text}
        | {k: float(batch.rewards[i][k]) for k in ("overall", "accuracy", "format", "overlong")}
        | {"advantage": float(advantages[i]), "finish_reason": batch.outs[i].finish_reason}
        | {"trained": bool(batch.trained[i])}
        for i in mine
    ]
    gathered = dist.all_gather_list(records, d)  # N per rank, then N of those
    pick = np.random.default_rng(dist.derive_seed(cfg.seed, "log-rollouts", step))
    return [
        gathered[i] for i in sorted(pick.choice(len(gathered), min(cfg.log_rollouts, len(gathered)), replace=False))
    ]


def validate(engine, model, val_rows: list[dict], cfg: GRPOConfig, d: dist.Dist, pool, step: int) -> float:
    """Validation accuracy after `step` updates: one sample per prompt at val_temperature."""
    engine.push_weights(model, version=step)
    seed = dist.derive_seed(cfg.seed, "val", step)
    sampling = rollout.Sampling(cfg.val_temperature, 1.0, cfg.max_response_length, seed)
    accuracy = rollout.validation_accuracy(engine, val_rows, d, sampling, val_scorer(cfg, pool))
    engine.sleep()
    return accuracy


def val_scorer(cfg: GRPOConfig, pool):
    """correct(texts, rows) -> list of 0/1 for validation: the benchmark's own rule on its own row
    (--val-benchmark), else reward.py's accuracy."""
    if cfg.val_benchmark:
        return lambda texts, rows: [
            benchmarks.score_answer(cfg.val_benchmark, t, r["benchmark_row"]) for t, r in zip(texts, rows)
        ]
    return lambda texts, rows: [
        s["accuracy"]
        for s in reward.score_responses(texts, rows, scoring(cfg), pool=pool, timeout_s=cfg.reward_timeout_s)
    ]


# --- Setup ---


def load_data(cfg: GRPOConfig, processor, fmt: chat.PromptFormat, d: dist.Dist) -> tuple[list[dict], list[dict], int]:
    """Training and validation rows through the door (prepare.py: fields, text, image headers, the
    prompt within --max-prompt-length; a bad row is an error or left out) and the run's step count."""
    door = prepare.Door("rl", cfg.min_pixels, cfg.max_pixels, cfg.max_prompt_length, fmt)
    common = dict(skip_bad_rows=cfg.skip_bad_rows)
    rows = prepare.prepare_split(cfg.data, door, processor, d, split="train", limit=cfg.train_limit, **common)
    val_rows = []
    if cfg.val_benchmark:  # a benchmark file: its prompts, its scoring rule (validate)
        raw = benchmarks.load_benchmark(cfg.val_benchmark, cfg.val_data or None, cfg.val_limit)
        val_rows, bad = benchmarks.prompt_rows(cfg.val_benchmark, raw, cfg.min_pixels, cfg.max_pixels)
        if bad and d.master:
            print(f"[grpo] validation: {len(bad)} unusable {cfg.val_benchmark} rows left out; first: {bad[0]}")
        if not val_rows:
            raise config.BadRowError(
                f"--val-benchmark {cfg.val_benchmark}: no usable row in {cfg.val_data or 'the hub copy'}"
            )
        spec = f"{cfg.val_data or cfg.val_benchmark} (--val-benchmark {cfg.val_benchmark})"
        val_rows = prepare.prepare_rows(val_rows, door, processor, d, spec=spec, **common)
    elif cfg.val_data:
        val_rows = prepare.prepare_split(cfg.val_data, door, processor, d, split="val", limit=cfg.val_limit, **common)
    return rows, val_rows, cfg.max_steps or math.ceil(cfg.episodes * len(rows) / cfg.rollout_batch_size)


def load_models(policy_path: str, cfg: GRPOConfig, d: dist.Dist):
    """(processor, policy, frozen reference or None, AdamW) for a run starting from policy_path. The policy
    keeps fp32 master weights (FSDP2-sharded under torchrun); the reference is the STARTING model
    (cfg.model, also on resume), sharded the same way, only when kl_coef > 0."""
    processor = modeling.load_processor(policy_path, cfg.min_pixels, cfg.max_pixels)
    model = modeling.shard_model(
        modeling.load_model(policy_path, d.device, cfg.gradient_checkpointing, trainable=True), d
    )
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = modeling.shard_model(modeling.load_model(cfg.model, d.device).eval().requires_grad_(False), d)
    optimizer = modeling.create_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, d.device)  # fused on CUDA
    return processor, model, ref_model, optimizer


def make_engine(model, processor, policy_path: str, version: int, fmt: chat.PromptFormat, cfg: GRPOConfig,
                d: dist.Dist):  # fmt: skip
    """The rollout engine: HF generate on the policy, or vLLM started from policy_path (weights after `version`
    steps); on a GPU vLLM's memory share is memory_plan_utilization's unless --gpu-memory-utilization gives one."""
    utilization = cfg.gpu_memory_utilization
    if not utilization and d.device.type == "cuda" and cfg.engine != "hf":
        utilization = memory_plan_utilization(policy_path, cfg, d)
    return rollout.make_engine(
        cfg.engine, model, processor, d, model_path=policy_path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        prompt_format=fmt, batch_size=cfg.micro_batch_size * 2, weights_version=version,
        gpu_memory_utilization=utilization or 0.75,  # (CPU: unused, its KV cache has a size of its own)
        max_model_len=cfg.max_prompt_length + cfg.max_response_length,
    )  # fmt: skip


def memory_plan_utilization(policy_path: str, cfg: GRPOConfig, d: dist.Dist) -> float:
    """vLLM's gpu_memory_utilization from the memory plan of this run (model config, world size,
    token budget, this card's total memory): vLLM sizes its KV cache once, when the trainer is
    still small, so the share must leave room for the trainer after step 1 (AdamW state)."""
    from transformers import AutoConfig

    run = memory.run_settings(cfg, d.world_size)
    card = torch.cuda.get_device_properties(d.device).total_memory / memory.GIB
    utilization = memory.gpu_memory_utilization(AutoConfig.from_pretrained(policy_path), card, run)
    if d.master:
        print(
            f"[grpo] memory plan: vLLM gets {utilization:.2f} of {card:.1f} GiB (--gpu-memory-utilization to override)"
        )
    return utilization


# Validation seeds its own sampling, so its settings may change on --resume too.
RESUME_MAY_CHANGE = config.RESUME_MAY_CHANGE | {
    "episodes", "val_every", "val_benchmark", "val_temperature", "reward_workers", "reward_timeout_s",
    "gpu_memory_utilization",
}  # fmt: skip


def validate_config(cfg: GRPOConfig) -> None:
    """Stops with one `error:` line per combination of settings that would run but train nothing
    useful, saying what to use (each value's own bounds were checked by config.parse_config)."""
    problems = []
    if cfg.group_size < 2:
        problems.append(
            f"--group-size {cfg.group_size}: a group of fewer than 2 has no signal; use at least 2 (paper: 8)"
        )
    if cfg.vas and cfg.vas_rollouts < 2:
        problems.append(
            f"--vas-rollouts {cfg.vas_rollouts}: the pass-rate variance of fewer than 2 rollouts is 0, "
            "so VAS would sample uniformly; use at least 2 (paper: 16)"
        )
    if cfg.max_steps == 0 and cfg.episodes <= 0:
        problems.append(
            f"--max-steps {cfg.max_steps} --episodes {cfg.episodes}: no step would run and final/ "
            "would be the untrained model; give --max-steps > 0, or 0 with --episodes > 0"
        )
    problems += cfg.range_problems()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the batch is split evenly over ranks
    if cfg.rollout_batch_size % world_size:
        problems.append(f"--rollout-batch-size {cfg.rollout_batch_size} must be divisible by {world_size} ranks")
    if not 0 <= cfg.overlong_buffer <= cfg.max_response_length or cfg.overlong_penalty < 0:
        problems.append(
            f"--overlong-buffer {cfg.overlong_buffer} --overlong-penalty {cfg.overlong_penalty}: use a buffer in "
            f"[0, --max-response-length {cfg.max_response_length}] and a penalty >= 0"
        )
    if not cfg.dynamic_sampling and cfg.max_sampling_rounds != GRPOConfig.max_sampling_rounds:
        problems.append(f"--max-sampling-rounds {cfg.max_sampling_rounds} has no effect without --dynamic-sampling")
    if cfg.tis_cap < 0:
        problems.append(f"--tis-cap {cfg.tis_cap}: a cap on the importance weight, use a value > 0 (0 = off)")
    if problems:
        config.fail(*problems)


def use_toy_defaults(cfg: GRPOConfig) -> None:
    """Takes what --model / --data leave out from the toy (--toy NAME, the default toy when neither
    is given): its SFT checkpoint, its RL splits (train, first 512 prompts; val)."""
    if not config.toy_fills_in(cfg):
        return
    folder = toy.VARIANT_DATA_DIRS[cfg.toy]
    if not cfg.model:
        sft_model = toy.run_dir("sft", cfg.toy) / "final"
        if not (sft_model / "config.json").exists():
            flag = "" if cfg.toy == "default" else f" --toy {cfg.toy}"
            config.fail(f"no toy SFT checkpoint at {sft_model}: run `python sft.py{flag}` first")
        cfg.model = str(sft_model)
    if not cfg.data:
        toy.ensure_toy(variant=cfg.toy)
        cfg.data = str(folder / "rl") + "@train"
        cfg.val_data = cfg.val_data or str(folder / "rl") + "@val"
        cfg.train_limit = cfg.train_limit or 512
    if cfg.output_dir == GRPOConfig.output_dir:
        cfg.output_dir = str(toy.run_dir("grpo", cfg.toy).relative_to(toy.ROOT))
    if cfg.toy in toy.GREEDY_VAL_VARIANTS and cfg.val_temperature == GRPOConfig.val_temperature:
        cfg.val_temperature = 0.0  # greedy: the slip is a greedy habit, and greedy val is not sampling noise


def main() -> None:
    cfg, d, out_dir = run.setup(GRPOConfig, PRESETS, validate_config, use_toy_defaults, "grpo")
    fmt = chat.PromptFormat(instruction=chat.INSTRUCTIONS.get(cfg.instruction, cfg.instruction))
    check_packing(cfg.model, cfg.pack)  # a family packed rows are not exact for: one line naming --no-pack
    processor = modeling.load_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    rows, val_rows, total_steps = load_data(cfg, processor, fmt, d)  # the door: the loop trusts these rows

    # --- models, optimizer, sampler, engine (a resumed run takes all but the reference from its checkpoint) ---
    r = run.Run(cfg, d, out_dir, "grpo", RESUME_MAY_CHANGE, len(rows), total_steps)
    processor, model, ref_model, optimizer = load_models(r.policy_path, cfg, d)
    sampler = vas.MixedSampler(len(rows), cfg.rollout_batch_size, cfg.vas_mix_ratio if cfg.vas else 0.0, cfg.seed)
    state = SamplerState(sampler, np.zeros(len(rows)))  # the sampler, raw VPS per prompt, generation budget

    def save(folder: Path, step: int) -> None:  # reads the current sampler state
        checkpoint.save_training_checkpoint(model, processor, optimizer, folder, d, step, cfg, **state.state_dict())

    if (saved := r.start(model, optimizer, save)) is not None:
        state.load_state_dict(saved)
    modeling.create_optimizer_state(optimizer)  # AdamW's state now: vLLM's start-up check sees the step-1 trainer
    engine = make_engine(model, processor, r.policy_path, r.start_step, fmt, cfg, d)
    r.close_on_exit(engine.close)  # on every exit (an error, a preemption before step 1), before the process group
    pool = reward.RewardPool(cfg.reward_workers, cfg.reward_timeout_s)  # 0 workers: in this process, same limit
    r.close_on_exit(pool.close)
    r.announce(
        f"{len(rows)} prompts, {total_steps} steps x {cfg.rollout_batch_size} prompts x {cfg.group_size} "
        f"responses, {d.world_size} rank(s), engine {type(engine).__name__}, vas={cfg.vas}"
    )
    initial_vas_s = 0.0
    if cfg.vas and r.start_step == 0:  # initial scoring of every prompt before step 1
        t0 = time.time()
        scores = refresh_vps(engine, model, rows, state, cfg, d, pool, 0, out_dir)
        initial_vas_s = time.time() - t0
        r.print0(
            f"initial VPS of {len(rows)} prompts in {initial_vas_s:.0f}s: mean pass rate "
            f"{scores['pass_rate'].mean():.3f}, zero-variance share {np.mean(scores['ovs'] == 0):.3f}"
        )
    if val_rows and cfg.val_every and r.start_step == 0:  # the starting point of the val curve
        r.logger.log(0, {"val/accuracy": validate(engine, model, val_rows, cfg, d, pool, 0)})

    # --- training loop ---
    r.stop_before_training("the initial scoring")  # later: save after this step, exit 0
    model.train()
    no_signal = NoSignalWatch()  # a run whose groups never carry signal says so
    for step in (bar := r.steps()):
        done, clock = step + 1, PhaseClock(vas=initial_vas_s if step == r.start_step else 0.0)
        # --- rollouts: the sampler's prompts, n responses each, rewards (--dynamic-sampling: refill) ---
        batch = sample_batch(engine, model, sampler, rows, processor, fmt, pool, cfg, d, step)
        clock.lap("rollout")
        # --- advantages: (r_i - mean_group) / (std_group + eps), zero-variance groups 0 (--adv-norm none: no std) ---
        overall = torch.tensor([x["overall"] for x in batch.rewards])
        advantages, zero_var = ADVANTAGES[cfg.adv_norm](overall, cfg.group_size, cfg.adv_eps)
        # --- update: clipped surrogate + k3 KL, token mean over the global batch, AdamW ---
        micro = micro_batches(processor, batch.outs, batch.prompts, advantages, cfg, d, batch.trained)
        stats, grad_norm = update_policy(model, ref_model, optimizer, micro, cfg, d)
        r.nonfinite.check(done, stats["loss"], grad_norm)  # stops a diverged run before anything is saved
        clock.lap("update")
        # --- VAS: re-weight the sampler by VPS (--vas-online: this step's groups; every T_update steps: all) ---
        vas_phase(engine, model, rows, batch, state, cfg, d, pool, done, total_steps, out_dir)
        clock.lap("vas")
        # --- log, validate, save ---
        metrics = step_metrics(batch, zero_var, (stats, grad_norm), clock, state, optimizer, model, engine, cfg, d)
        if cfg.log_rollouts:
            r.logger.log_rollouts(done, rollout_records(batch, advantages, cfg, d, done))
        if val_rows and ((cfg.val_every and done % cfg.val_every == 0) or done == total_steps):
            metrics["val/accuracy"] = validate(engine, model, val_rows, cfg, d, pool, done)
        if warning := no_signal.update(metrics, cfg):
            r.print0(warning)
        bar.set_postfix(acc=f"{metrics['reward/accuracy']:.2f}", zero_var=f"{metrics['vas/zero_var_frac']:.2f}")
        if r.end_step(done, metrics):  # log; save every N; preemption or --stop-after: stop here
            break

    if engine.pushes:
        r.print0(f"vLLM weight pushes: {engine.pushes} (one per new set of weights; repeats skipped)")
    r.finish()  # final save, summary, then the engine and pool, the logger, the process group


if __name__ == "__main__":
    run.main(main)  # an InputError -> one line, exit 1; any exit closes the engine before the process group
