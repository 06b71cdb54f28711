"""--dynamic-sampling (DAPO): groups whose accuracies are all equal are dropped and the batch refilled
from the same sampler, every generated token counted; checked on the real HF engine and the toy SFT
model (whose groups have signal about two times in three), against a naive re-derivation from what
was sampled, end to end on one process and under torchrun, and for an exact resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from test_grpo import METRICS  # the names docs/grpo.md documents

import grpo
import vas
from conftest import run_script
from mmr1 import chat, dist, modeling, prepare, rollout

CPU = dist.Dist(0, 1, 0, torch.device("cpu"))
B, N = 4, 4  # prompts per step, responses per prompt


@pytest.fixture(scope="module")
def policy(toy_sft, toy_dir):
    """(model, processor, rows through the door) for the toy SFT model and the toy's first 16 RL prompts."""
    processor = modeling.load_processor(str(toy_sft))
    model = modeling.load_model(str(toy_sft), torch.device("cpu"))
    door = prepare.Door("rl", 3136, 50176, 2048, chat.PromptFormat())
    rows = prepare.prepare_split(f"{toy_dir / 'data' / 'rl'}@train", door, processor, CPU, split="train", limit=16)
    return model, processor, rows


def sample(policy, step=0, **changes):
    model, processor, rows = policy
    cfg = grpo.GRPOConfig(rollout_batch_size=B, group_size=N, max_response_length=48, reward_workers=0, **changes)
    engine = rollout.HFEngine(model, processor, CPU, min_pixels=3136, max_pixels=50176, batch_size=16)
    sampler = vas.MixedSampler(len(rows), B, 0.0, cfg.seed)
    batch = grpo.sample_batch(engine, model, sampler, rows, processor, chat.PromptFormat(), None, cfg, CPU, step)
    return batch, sampler, cfg


def test_off_is_one_round_of_the_sampler_batch(policy):
    """Without the flag: one round, the sampler's next batch, the rollouts the engine gives for the
    step's seed (the loop before the options), every response trained."""
    model, processor, rows = policy
    batch, _, cfg = sample(policy, step=3)
    ids = vas.MixedSampler(len(rows), B, 0.0, 0).next_batch()
    part = [rows[i] for i in ids]
    engine = rollout.HFEngine(model, processor, CPU, min_pixels=3136, max_pixels=50176, batch_size=16)
    seed = dist.derive_seed(cfg.seed, "rollout", 3)
    outs = engine.generate(part, N, rollout.Sampling(cfg.temperature, cfg.top_p, 48, seed))
    assert batch.rounds == 1 and batch.prompt_ids == ids and len(batch.sampled) == B
    assert [(o.row, o.token_ids) for o in batch.outs] == [(o.row, o.token_ids) for o in outs]
    assert bool(batch.trained.all()) and batch.trained.shape == (B * N,)


@pytest.mark.parametrize("rounds", [1, 4])
def test_keeps_the_first_groups_with_signal_and_counts_every_round(policy, rounds):
    """The trained groups are the first B of all sampled groups (in sampling order) whose accuracies
    differ; the rounds stop at the first that fills the batch; out of rounds, the shortfall is the
    first dropped groups with all-zero weight; the sampler gave one global batch per round."""
    batch, sampler, _ = sample(policy, dynamic_sampling=True, max_sampling_rounds=rounds)
    signal = [g for g in batch.sampled if len({r["accuracy"] for r in g.rewards}) > 1]
    dead = [g for g in batch.sampled if len({r["accuracy"] for r in g.rewards}) == 1]
    needed = next((r for r in range(1, rounds + 1) if len(signal[: r * B]) >= B and
                   sum(g in signal for g in batch.sampled[: r * B]) >= B), rounds)  # fmt: skip
    assert batch.rounds == needed and len(batch.sampled) == needed * B
    kept = signal[:B]
    expected = kept + dead[: B - len(kept)]
    assert batch.prompt_ids == [g.prompt_id for g in expected]
    assert [o.token_ids for o in batch.outs] == [o.token_ids for g in expected for o in g.outs]
    assert [o.row for o in batch.outs] == [g for g in range(B) for _ in range(N)]  # re-indexed into batch.rows
    assert batch.trained.tolist() == [g < len(kept) for g in range(B) for _ in range(N)]
    fresh = vas.MixedSampler(16, B, 0.0, 0)
    assert [g.prompt_id for g in batch.sampled] == [i for _ in range(needed) for i in fresh.next_batch()]
    assert sampler.state_dict()["pos"] == fresh.state_dict()["pos"]
    if rounds == 1:  # the seed's first batch has a dead group: this case is the short one
        assert len(kept) < B and not batch.trained.all()
    else:
        assert needed >= 2 and bool(batch.trained.all())


def test_perf_metrics_count_every_token_of_both_phases(policy):
    """perf/ metrics: generated response tokens of every round per rollout second, prompt + response
    tokens of the trained sequences per update second (hand-summed); no MFU off CUDA."""
    model, _, _ = policy
    batch, _, cfg = sample(policy, dynamic_sampling=True, max_sampling_rounds=4)
    got = grpo.perf_metrics(model.config, batch, 2.0, 4.0, rollout.HFEngine, cfg, CPU)  # no shared prefill
    generated = sum(len(o.token_ids) for g in batch.sampled for o in g.outs)
    trained = sum(len(batch.prompts[o.row].ids) + len(o.token_ids) for o in batch.outs)
    assert got == {"perf/rollout_tokens_per_s": generated / 2.0, "perf/update_tokens_per_s": trained / 4.0}
    assert generated > sum(len(o.token_ids) for o in batch.outs)  # the refills' tokens are in


def test_filler_groups_weigh_nothing(policy):
    """The loss and gradient of a batch whose filler groups are masked equal those of the kept groups
    alone (same global normaliser): filler responses add no weight and no token to any divisor."""
    model, processor, _ = policy
    batch, _, cfg = sample(policy, dynamic_sampling=True, max_sampling_rounds=1)
    cfg = dataclasses.replace(cfg, kl_coef=0.0, updates_per_batch=1)
    overall = torch.tensor([r["overall"] for r in batch.rewards])
    adv, _ = grpo.group_advantages(overall, N)
    kept = int(batch.trained.sum()) // N

    def grads(outs, rows, prompts, advantages, trained):
        model.zero_grad()
        micro = grpo.micro_batches(processor, outs, prompts, advantages, cfg, CPU, trained)
        stats = grpo.policy_loss_backward(model, micro, cfg, CPU)
        return stats["loss"], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_all, g_all = grads(batch.outs, batch.rows, batch.prompts, adv, batch.trained)
    outs = batch.outs[: kept * N]
    loss_kept, g_kept = grads(outs, batch.rows[:kept], batch.prompts[:kept], adv[: kept * N], None)
    model.zero_grad()
    assert 0 < kept < B
    # the same sums over different packings: fp32 rounding of the toy's logits, ~1e-7 relative
    assert loss_all == pytest.approx(loss_kept, rel=1e-5, abs=1e-7)
    for a, b in zip(g_all, g_kept):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_vas_online_scores_dropped_groups_too():
    """refresh_vps_online reads every sampled group, dropped ones included, and merges a prompt drawn
    twice: the VPS of each prompt equals vas.score_prompts on all of its responses."""
    cfg = grpo.GRPOConfig(group_size=2)

    def group(pid, accuracies, tokens):
        outs = [rollout.Rollout(0, t, "", "stop") for t in tokens]
        return grpo.Group(pid, {}, None, outs, [{"accuracy": a} for a in accuracies])

    groups = [group(0, [1.0, 0.0], [[1, 2], [3]]), group(2, [1.0, 1.0], [[4], [4]]), group(0, [0.0, 0.0], [[5], [6]])]
    vps, sampler = np.zeros(3), vas.MixedSampler(3, 2, 0.5, 0)
    grpo.refresh_vps_online(vps, sampler, groups, cfg, CPU)
    want = vas.score_prompts([[[1, 2], [3], [5], [6]], [[4], [4]]], [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0]])["vps"]
    assert vps.tolist() == [want[0], 0.0, want[1]]
    assert grpo.has_signal(groups[0]) and not grpo.has_signal(groups[1])


def dynamic_args(toy_dir, toy_sft, out, steps, *extra):
    data = toy_dir / "data" / "rl"
    return ["grpo.py", "--model", str(toy_sft), "--data", f"{data}@train", "--val-data", f"{data}@val",
            "--output-dir", str(out), "--max-steps", str(steps), "--train-limit", "16", "--rollout-batch-size", "4",
            "--group-size", "4", "--max-response-length", "48", "--val-limit", "4", "--val-every", "0",
            "--reward-workers", "0", "--engine", "hf", "--dynamic-sampling", "--max-sampling-rounds", "3", *extra]  # fmt: skip


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_torchrun_dynamic_sampling_with_vas_online(toy_dir, toy_sft, tmp_path):
    """Two ranks (gloo), every GRPO option on: the rounds are agreed (a disagreement would hang the all-reduce), the
    generation budget counts every sampled response (VAS's initial scoring of 16 x 2 included), the
    trained share is at most 1 and, when the batch was filled, the trained groups all have signal."""
    flags = ["--vas", "--vas-online", "--vas-rollouts", "2", "--vas-update-every", "0", "--log-rollouts", "3",
             # and the loss options, so each runs under torchrun too
             "--adv-norm", "none", "--loss-agg", "constant", "--ratio-level", "sequence", "--mask-truncated",
             "--overlong-buffer", "8", "--tis-cap", "2"]  # fmt: skip
    run_script(dynamic_args(toy_dir, toy_sft, tmp_path / "run", 3, *flags), torchrun=2)
    lines = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert len(lines) == 3 and METRICS - {"val/accuracy"} <= set(lines[0])
    sampled = np.cumsum([r["rollout/sampled_responses"] for r in lines])
    assert [r["rollout/generated_responses"] for r in lines] == (16 * 2 + sampled).tolist()
    for r in lines:
        assert r["rollout/sampled_responses"] == B * N * r["rollout/sampling_rounds"]
        assert 1 <= r["rollout/sampling_rounds"] <= 3 and 0 <= r["rollout/trained_frac"] <= 1
        assert r["vas/zero_var_frac"] == pytest.approx(1 - r["rollout/trained_frac"])  # trained: all with signal
    # --log-rollouts 3: three of each step's responses, drawn over both ranks
    logged = [json.loads(x) for x in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for x in logged:
        assert set(x) == {"step", "prompt_id", "response", "overall", "accuracy", "format", "overlong", "advantage",
                          "finish_reason", "trained"}  # fmt: skip
        assert 0 <= x["prompt_id"] < 16 and isinstance(x["response"], str) and x["accuracy"] in (0.0, 1.0)
