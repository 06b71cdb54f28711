"""grpo.py's GRPO options: the loss variants (--adv-norm, --loss-agg, --ratio-level), --mask-truncated
and DAPO's overlong punishment, each against a naive per-response reference or hand-computed numbers.

The loss tests use a stand-in policy: the log-prob of token t of response i is theta[ids[i, t]], a
parameter vector, so policy_loss_backward runs its real aggregation, and gradients are exact and cheap."""

import dataclasses

import pytest
import torch

import grpo
from mmr1 import dist, rollout

CPU = dist.Dist(0, 1, 0, torch.device("cpu"))
LENGTHS = [3, 1, 6, 4, 2]  # response tokens of the five responses
ADV = torch.tensor([1.0, -0.5, 0.3, -2.0, 0.8])
KL_COEF = 0.1


class StandIn(torch.nn.Module):
    """theta: one log-prob per position id; the 'forward' of batch_logprobs below reads it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = torch.nn.Parameter(-1.0 - torch.rand(sum(LENGTHS) + 8, generator=g))


@pytest.fixture(autouse=True)
def stand_in_logprobs(monkeypatch):
    def batch_logprobs(model, inputs, device, chunk, grad, temperature, pack):
        logp = model.theta[inputs["ids"]]  # (B, T)
        return logp, torch.zeros_like(logp)

    monkeypatch.setattr(grpo.logprobs, "batch_logprobs", batch_logprobs)


def response_tensors():
    """Per response i: position ids into theta, old and reference log-probs (seeded, near theta so the
    ratios straddle the clip range)."""
    g = torch.Generator().manual_seed(1)
    start, out = 0, []
    theta = StandIn().theta.detach()
    for n in LENGTHS:
        ids = torch.arange(start, start + n)
        start += n
        old = theta[ids] + 0.3 * torch.randn(n, generator=g)
        ref = theta[ids] + 0.5 * torch.randn(n, generator=g)
        out.append((ids, old, ref))
    return out


def micro_batch(idx: list[int]) -> dict:
    """Responses idx right-padded into one (B, T) micro-batch; padding points at a theta entry no
    response uses, with mask 0 (it must not leak into the loss)."""
    per = response_tensors()
    width = max(LENGTHS[i] for i in idx)
    pad_id = sum(LENGTHS) + 3
    ids = torch.full((len(idx), width), pad_id)
    old, ref, mask = torch.zeros(len(idx), width), torch.zeros(len(idx), width), torch.zeros(len(idx), width)
    for row, i in enumerate(idx):
        n = LENGTHS[i]
        ids[row, :n], old[row, :n], ref[row, :n], mask[row, :n] = per[i][0], per[i][1], per[i][2], 1.0
    return {"inputs": {"ids": ids}, "response_mask": mask, "advantages": ADV[idx], "old_logp": old, "ref_logp": ref}


def run_ranks(ranks: list[list[list[int]]], cfg, monkeypatch) -> tuple[float, torch.Tensor]:
    """policy_loss_backward on each simulated rank (its micro-batches); the collective returns the
    global counts, as dist.all_reduce_dict would under torchrun; the gradients are summed (FSDP2,
    divide factor 1). Returns (sum of the ranks' local losses, summed gradient)."""
    masks = [micro_batch(idx)["response_mask"] for rank in ranks for idx in rank]
    counts = {
        "tokens": float(sum(m.sum() for m in masks)),
        "responses": float(sum((m.sum(1) > 0).sum() for m in masks)),
    }

    def all_reduce_dict(values, device):
        if set(values) == {"tokens", "responses"}:
            return dict(counts)
        return dict(values)

    monkeypatch.setattr(grpo.dist, "all_reduce_dict", all_reduce_dict)
    model, loss = StandIn(), 0.0
    for rank in ranks:
        stats = grpo.policy_loss_backward(model, [micro_batch(idx) for idx in rank], cfg, CPU)
        loss += stats["loss"]  # each rank's share of the global loss (its sum / the global divisor)
    return loss, model.theta.grad.clone()


def reference_loss(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive per-response loop, in float64: the variant's objective written from its paper."""
    theta = StandIn().theta.detach().double().requires_grad_()
    per_response = []
    for (ids, old, ref), a in zip(response_tensors(), ADV.double()):
        logp, old, ref = theta[ids], old.double(), ref.double()
        if cfg.ratio_level == "token":
            ratio = torch.exp(logp - old)  # (n,)
        else:  # GSPO: one length-normalised ratio for the whole response
            ratio = torch.exp((logp - old).mean()).expand(len(ids))
        surrogate = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
        d = ref - logp
        kl = torch.clamp(torch.exp(d) - d - 1, -10, 10)
        per_response.append(surrogate + KL_COEF * kl)  # (n,) token losses of response i
    if cfg.loss_agg == "token-mean":
        loss = sum(t.sum() for t in per_response) / sum(LENGTHS)
    elif cfg.loss_agg == "seq-mean":
        loss = sum(t.mean() for t in per_response) / len(LENGTHS)
    else:
        loss = sum(t.sum() for t in per_response) / (cfg.max_response_length * len(LENGTHS))
    loss.backward()
    return loss.detach(), theta.grad


SPLITS = {
    "one micro-batch": [[[0, 1, 2, 3, 4]]],
    "three micro-batches": [[[0, 1], [2], [3, 4]]],
    "two ranks": [[[0], [1, 2]], [[3, 4]]],
}


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean", "constant"])
def test_loss_variants_equal_a_per_response_loop_however_split(loss_agg, ratio_level, monkeypatch):
    """Every (aggregation, ratio level): the loss and gradient of policy_loss_backward equal the naive
    float64 loop, on one micro-batch, three, and two ranks. fp32 tolerance: each value is a sum of
    at most 16 terms of size <= ~5, so the rounding error is below 16 * 5 * 6e-8 ~ 5e-6 in absolute."""
    cfg = grpo.GRPOConfig(kl_coef=KL_COEF, loss_agg=loss_agg, ratio_level=ratio_level, max_response_length=8)
    want_loss, want_grad = reference_loss(cfg)
    assert want_grad.abs().max() > 0.01  # a real signal to compare
    for name, ranks in SPLITS.items():
        loss, grad = run_ranks(ranks, cfg, monkeypatch)
        assert loss == pytest.approx(want_loss.item(), abs=5e-6), name
        assert torch.allclose(grad.double(), want_grad, atol=5e-6, rtol=0), name


def test_the_variants_differ():
    """Guard that the comparison above can fail: the aggregations and ratio levels give different
    losses on these tensors (responses of unequal length, ratios away from 1)."""
    losses = {}
    for agg in ("token-mean", "seq-mean", "constant"):
        for level in ("token", "sequence"):
            cfg = grpo.GRPOConfig(kl_coef=KL_COEF, loss_agg=agg, ratio_level=level, max_response_length=8)
            losses[agg, level] = round(reference_loss(cfg)[0].item(), 6)
    assert len(set(losses.values())) == 6


def old_policy_loss_backward(model, micro, cfg, d):
    """policy_loss_backward before the options (a copy): the global token mean of PPO's token loss."""
    from mmr1 import logprobs

    local_tokens = sum(float(b["response_mask"].sum()) for b in micro)
    total_tokens = max(1.0, dist.all_reduce_sum(local_tokens, d.device).item())
    sums = {"loss": 0.0, "pg": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0}
    for b in micro:
        mask = b["response_mask"].to(d.device)
        logp, entropy = logprobs.batch_logprobs(
            model, b["inputs"], d.device, cfg.logprob_chunk, True, cfg.temperature, cfg.pack
        )
        old_logp = b["old_logp"].to(d.device) if "old_logp" in b else logp.detach()
        adv = b["advantages"].to(d.device)[:, None]
        pg, clipped = grpo.clipped_surrogate(logp, old_logp, adv, cfg.clip_low, cfg.clip_high)
        kl = grpo.k3_kl(logp, b["ref_logp"].to(d.device)) if "ref_logp" in b else torch.zeros_like(logp)
        loss = ((pg + cfg.kl_coef * kl) * mask).sum()
        (loss / total_tokens).backward()
        for name, value in (("loss", loss), ("pg", pg), ("kl", kl), ("clipped", clipped.float()), ("entropy", entropy)):
            sums[name] += float(value if name == "loss" else (value * mask).sum())
    return {k: v / total_tokens for k, v in dist.all_reduce_dict(sums, d.device).items()}


@pytest.mark.parametrize("with_old", [True, False])
def test_defaults_are_bit_identical_to_the_loss_before(with_old):
    """--adv-norm std, --loss-agg token-mean, --ratio-level token: the same stats and the same
    gradient bits as the code before the variants (with and without separate old log-probs)."""
    cfg = grpo.GRPOConfig(kl_coef=KL_COEF)
    results = []
    for fn in (old_policy_loss_backward, grpo.policy_loss_backward):
        micro = [micro_batch([0, 1]), micro_batch([2, 3, 4])]
        for b in micro if not with_old else []:
            del b["old_logp"]
        model = StandIn()
        stats = fn(model, micro, cfg, CPU)
        results.append((stats, model.theta.grad.clone()))
    assert results[0][0] == {k: results[1][0][k] for k in results[0][0]}
    assert torch.equal(results[0][1], results[1][1])
    assert grpo.ADVANTAGES["std"] is grpo.group_advantages


def test_centred_advantages_hand_computed():
    """--adv-norm none (Dr. GRPO): r - group mean, no std; equal-reward groups 0 and flagged."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero_var = grpo.centred_advantages(rewards, 4)
    assert adv.tolist() == [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]
    assert zero_var.tolist() == [False, True]
    std_adv, std_zero = grpo.group_advantages(rewards, 4)
    assert torch.equal(std_zero, zero_var)
    assert std_adv[0].item() == pytest.approx(0.75 / (0.5 + 1e-6))  # the std of (1, 0, 0, 0) is 0.5


def test_mask_truncated_leaves_truncated_responses_out(monkeypatch):
    """--mask-truncated: a truncated response's tokens weigh 0 and it counts in no normaliser. The loss
    and gradient with responses 1 and 3 masked equal those of the batch without them."""
    cfg = grpo.GRPOConfig(kl_coef=KL_COEF, loss_agg="seq-mean", max_response_length=8)
    masked = [micro_batch([0, 1, 2]), micro_batch([3, 4])]
    masked[0]["response_mask"][1] = 0  # what micro_batches does to a truncated response under --mask-truncated
    masked[1]["response_mask"][0] = 0
    model = StandIn()
    loss = grpo.policy_loss_backward(model, masked, cfg, CPU)["loss"]
    grad = model.theta.grad.clone()
    model = StandIn()
    want = grpo.policy_loss_backward(model, [micro_batch([0, 2]), micro_batch([4])], cfg, CPU)["loss"]
    assert loss == pytest.approx(want, abs=1e-6)  # fp32, a few terms of size ~1
    assert torch.allclose(grad, model.theta.grad, atol=1e-6, rtol=0)


def test_micro_batches_mask_truncated(toy_model):
    """grpo.micro_batches zeroes exactly the truncated responses' mask rows under --mask-truncated, and
    leaves the mask as it was (values and dtype) without it."""
    from data import toy
    from mmr1 import batches, chat

    model, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [toy.draw_grid(["red"] * 4)]}]
    fmt = chat.PromptFormat()
    prompts = batches.build_prompts(processor, rows, fmt, 3136, 50176)
    outs = [rollout.Rollout(0, [5, 6, 7], "a", "stop"), rollout.Rollout(0, [8, 9, 10, 11], "b", "length")]
    adv = torch.tensor([1.0, -1.0])
    for on in (False, True):
        cfg = grpo.GRPOConfig(mask_truncated=on, max_tokens_per_micro_batch=0, micro_batch_size=4)
        (b,) = grpo.micro_batches(processor, outs, prompts, adv, cfg, CPU)
        [(_, _, plain)] = batches.rl_micro_batches(processor, [prompts[0]] * 2, [o.token_ids for o in outs], 0, 4, CPU)
        assert b["response_mask"].dtype == plain.dtype
        assert b["response_mask"][0].equal(plain[0]) and plain[1].sum() == 4
        assert b["response_mask"][1].sum() == (0 if on else 4)


@pytest.mark.parametrize(
    "length, want",
    [(0, 0.0), (6, 0.0), (7, -0.25), (8, -0.5), (10, -1.0)],  # Lmax 10, buffer 4: penalty from length 7
)
def test_overlong_penalty_hand_computed(length, want):
    """DAPO: 0 up to Lmax - N = 6 tokens, then -P (L - 6) / N, P = 1."""
    assert grpo.overlong_penalty(length, 10, 4, 1.0) == pytest.approx(want)
    assert grpo.overlong_penalty(length, 10, 0, 1.0) == 0.0  # buffer 0: off


def test_score_adds_the_overlong_term_to_overall_not_accuracy():
    """score(): reward/overlong is its own term, added to the overall reward; the accuracy stays 0/1."""
    cfg = grpo.GRPOConfig(reward_workers=0, max_response_length=10, overlong_buffer=4, overlong_penalty=0.5)
    rows = [{"answer": "4"}]
    outs = [rollout.Rollout(0, list(range(n)), "<think>x</think><answer>4</answer>", "stop") for n in (5, 8)]
    plain = grpo.score(outs, rows, None, dataclasses.replace(cfg, overlong_buffer=0))
    scored = grpo.score(outs, rows, None, cfg)
    assert [r["overlong"] for r in scored] == [0.0, -0.25]  # -0.5 * (8 - 6) / 4
    assert [r["accuracy"] for r in scored] == [r["accuracy"] for r in plain]
    assert [r["overall"] for r in scored] == [plain[0]["overall"], plain[1]["overall"] - 0.25]


def test_option_flags_are_off_by_default_and_not_in_the_paper_preset():
    """The option fields keep the plain GRPO behaviour by default and --preset paper leaves them alone."""
    defaults = grpo.GRPOConfig()
    assert (defaults.adv_norm, defaults.loss_agg, defaults.ratio_level) == ("std", "token-mean", "token")
    assert not defaults.mask_truncated and defaults.overlong_buffer == 0
    assert not defaults.dynamic_sampling and defaults.tis_cap == 0 and defaults.log_rollouts == 0
    fields = {"adv_norm", "loss_agg", "ratio_level", "mask_truncated", "overlong_buffer", "overlong_penalty",
              "dynamic_sampling", "max_sampling_rounds", "tis_cap", "log_rollouts"}  # fmt: skip
    assert not fields & set(grpo.PRESETS["paper"])
    assert set(grpo.RATIO_LOSSES) == {"token", "sequence"}
    assert set(grpo.LOSS_AGGREGATIONS) == {"token-mean", "seq-mean", "constant"}


def with_engine_logprobs(b: dict, engine: torch.Tensor) -> dict:
    """A micro-batch whose every response token carries the engine log-prob `engine` (B, T)."""
    return b | {"engine_logp": engine, "engine_mask": b["response_mask"].clone()}


def test_tis_cap_1_with_equal_logprobs_changes_nothing():
    """--tis-cap 1 where the engine's log-probs equal the trainer's old ones: weight min(exp(0), 1) = 1,
    the same stats and gradient bits as without TIS; the gap metrics read exactly 0."""
    results = []
    for cap in (0.0, 1.0):
        cfg = grpo.GRPOConfig(kl_coef=KL_COEF, tis_cap=cap)
        micro = [micro_batch([0, 1]), micro_batch([2, 3, 4])]
        micro = [with_engine_logprobs(b, b["old_logp"].clone()) for b in micro]
        model = StandIn()
        results.append((grpo.policy_loss_backward(model, micro, cfg, CPU), model.theta.grad.clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][0]["gap_abs_diff"] == results[0][0]["gap_k3"] == results[0][0]["gap_abs_diff_max"] == 0.0


def test_tis_weights_and_gap_metrics_against_a_loop():
    """Engine log-probs shifted from the trainer's: the TIS loss equals a per-token loop of
    min(exp(old - engine), C) x surrogate (token mean), and the gap metrics equal their definitions.
    fp32, ~16 terms of size <= ~5: tolerance 5e-6 as above."""
    g = torch.Generator().manual_seed(2)
    cap = 1.5
    micro = [micro_batch([0, 1]), micro_batch([2, 3, 4])]
    shifts = [0.4 * torch.randn(b["old_logp"].shape, generator=g) for b in micro]
    micro = [with_engine_logprobs(b, b["old_logp"] + s) for b, s in zip(micro, shifts)]
    cfg = grpo.GRPOConfig(kl_coef=0.0, tis_cap=cap)
    model = StandIn()
    stats = grpo.policy_loss_backward(model, micro, cfg, CPU)
    want, diffs = 0.0, []
    for b in micro:
        for row in range(len(b["advantages"])):
            a = float(b["advantages"][row])
            for t in range(int(b["response_mask"][row].sum())):
                logp = float(StandIn().theta[b["inputs"]["ids"][row, t]])
                old, engine = float(b["old_logp"][row, t]), float(b["engine_logp"][row, t])
                r = torch.exp(torch.tensor(logp - old, dtype=torch.float64)).item()
                surrogate = max(-a * r, -a * min(max(r, 0.8), 1.2))
                want += min(torch.exp(torch.tensor(old - engine, dtype=torch.float64)).item(), cap) * surrogate
                diffs.append(old - engine)
    assert stats["loss"] == pytest.approx(want / sum(LENGTHS), abs=5e-6)
    d = torch.tensor(diffs, dtype=torch.float64)
    assert stats["gap_abs_diff"] == pytest.approx(d.abs().mean().item(), abs=1e-6)
    assert stats["gap_k3"] == pytest.approx((torch.exp(d) - d - 1).mean().item(), abs=1e-6)
    assert stats["gap_abs_diff_max"] == pytest.approx(d.abs().max().item(), abs=1e-6)
    cfg_off = grpo.GRPOConfig(kl_coef=0.0)
    assert grpo.policy_loss_backward(StandIn(), micro, cfg_off, CPU)["loss"] != pytest.approx(stats["loss"], abs=1e-3)


def test_hf_engine_logprobs_equal_the_trainers(toy_model, monkeypatch):
    """The HF engine's sampled-token log-probs (from its scores at the rollout temperature) equal the
    trainer's log-probs of the same tokens, computed as the update computes old log-probs (packed).
    Same weights, same fp32 precision: the differences come only from the incremental (KV-cache,
    left-padded) forward against the packed full forward, and from the never-sampled tokens the engine
    suppresses (their probability mass leaves its normaliser): ~1e-5 at most on the toy."""
    from data import toy
    from mmr1 import batches, chat

    monkeypatch.undo()  # the real log-prob pass, not the stand-in
    model, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [toy.draw_grid(["red"] * 4)]},
            {"problem": "<image>How many blue squares?", "images": [toy.draw_grid(["blue", "red", "blue"])]}]  # fmt: skip
    fmt = chat.PromptFormat()
    prompts = batches.build_prompts(processor, rows, fmt, 3136, 50176)
    cfg = grpo.GRPOConfig(temperature=0.7, max_tokens_per_micro_batch=4096)
    engine = rollout.HFEngine(model, processor, CPU, min_pixels=3136, max_pixels=50176, batch_size=8)

    def gap_trainer_minus_engine():
        outs = engine.generate(rows, 2, rollout.Sampling(temperature=0.7, max_new_tokens=12, seed=3, logprobs=True))
        assert all(len(o.logprobs) == len(o.token_ids) for o in outs)
        micro = grpo.micro_batches(processor, outs, prompts, torch.zeros(len(outs)), cfg, CPU)
        gaps = []
        for b, trainer in zip(micro, grpo.frozen_token_logprobs(model, micro, cfg, CPU)):
            m = b["engine_mask"] > 0
            gaps.append(trainer[m] - b["engine_logp"][m])
        assert sum(len(g) for g in gaps) == sum(len(o.token_ids) for o in outs)  # every sampled token
        return torch.cat(gaps)

    suppressed = gap_trainer_minus_engine()
    # the engine never samples the vision placeholders: its normaliser leaves their mass out, so its
    # log-prob is log(1 - p_placeholders) higher than the trainer's (the untrained toy puts ~1% there)
    assert suppressed.max() < 1e-5 and suppressed.min() > -0.02, (suppressed.min(), suppressed.max())
    engine.forbidden = []  # the same distribution on both sides: only the forward differs
    assert gap_trainer_minus_engine().abs().max() < 1e-5


def test_grpo_script_with_the_options_on(toy_dir, tmp_path):
    """One end-to-end run, 2 steps, with Dr. GRPO's advantages and normaliser, GSPO's ratio,
    --mask-truncated, the overlong term and TIS on: every metric logged and finite, the HF engine's
    log-prob gap small (see test_hf_engine_logprobs_equal_the_trainers: only the suppressed
    placeholders' mass, < 0.02 on the untrained toy), the overlong term <= 0."""
    import json
    import math

    from test_grpo import METRICS

    from conftest import run_script

    data, out = toy_dir / "data" / "rl", tmp_path / "run"
    run_script(["grpo.py", "--model", str(toy_dir / "model"), "--data", f"{data}@train", "--val-data", f"{data}@val",
                "--output-dir", str(out), "--max-steps", "2", "--train-limit", "16", "--rollout-batch-size", "4",
                "--group-size", "4", "--max-response-length", "12", "--val-limit", "4", "--val-every", "0",
                "--reward-workers", "0", "--engine", "hf", "--adv-norm", "none", "--loss-agg", "constant",
                "--ratio-level", "sequence", "--mask-truncated", "--overlong-buffer", "4", "--overlong-penalty", "0.5",
                "--tis-cap", "2"])  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "train/loss" in r]
    assert len(steps) == 2 and METRICS - {"val/accuracy"} <= set(steps[0])
    assert all(math.isfinite(v) for r in steps for v in r.values())
    for r in steps:
        assert 0 <= r["rollout/logprob_abs_diff"] <= r["rollout/logprob_abs_diff_max"] < 0.02
        assert -0.5 <= r["reward/overlong"] <= 0


def test_compare_runs_table_and_png(tmp_path, capsys):
    """scripts/compare_runs.py on synthetic metrics.jsonl: two seeds of one arm grouped (mean of each
    run's last / best / mean), a lone run, the PNG written; values hand-computed."""
    import json
    import sys

    sys.path.insert(0, str(grpo.Path(__file__).resolve().parent.parent / "scripts"))
    import compare_runs

    runs = {"base-seed0": [0.1, 0.5, 0.3], "base-seed1": [0.3, 0.2, 0.7], "gspo": [0.0, 0.4]}
    for name, accs in runs.items():
        (tmp_path / name).mkdir()
        lines = [{"step": s, "val/accuracy": a, "rollout/generated_tokens": 100 * s} for s, a in enumerate(accs)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "compare.png"
    compare_runs.main(
        [str(tmp_path / n) for n in runs] + ["--metrics", "val/accuracy", "--out", str(out), "--x", "tokens"]
    )
    rows = capsys.readouterr().out.splitlines()
    # base: last (0.3 + 0.7) / 2 = 0.5, best (0.5 + 0.7) / 2 = 0.6, mean (0.3 + 0.4) / 2 = 0.35; gspo: 0.4 0.4 0.2
    assert "| base-seed* | val/accuracy | 0.5 | 0.6 | 0.35 | 2 |" in rows
    assert "| gspo | val/accuracy | 0.4 | 0.4 | 0.2 | 1 |" in rows
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit, match="error: .*metrics.jsonl not found"):
        compare_runs.main([str(tmp_path / "missing")])
    # against tokens, seeds align by step: step 0 at 0 tokens, later steps at their token counts
    lines = [{"step": 0, "val/accuracy": 0.1}, {"step": 1, "rollout/generated_tokens": 40.0}]
    assert compare_runs.tokens_by_step(lines) == {0: 0.0, 1: 40.0}


@pytest.mark.parametrize(
    "change",
    [{"tis_cap": -1.0}, {"overlong_buffer": -1}, {"overlong_buffer": 65}, {"overlong_penalty": -0.5},
     {"max_sampling_rounds": 5}],  # the last: without --dynamic-sampling it would do nothing
)  # fmt: skip
def test_bad_option_values_stop_with_one_line(change):
    """Out-of-range values of the new flags stop at the start, naming the flag (not silently off)."""
    cfg = dataclasses.replace(grpo.GRPOConfig(max_response_length=64), **change)
    with pytest.raises(SystemExit, match="--(tis-cap|overlong-buffer|max-sampling-rounds)"):
        grpo.validate_config(cfg)


def test_defaults_end_to_end_equal_the_commit_before_the_options(toy_dir, toy_sft, tmp_path):
    """The defaults, and the paper preset's loss and sampler settings at toy size (--preset paper itself
    needs CUDA; test_option_flags_are_off_by_default_and_not_in_the_paper_preset shows it sets none of
    the options), train bit for bit as grpo.py did before the options: 3 steps from the toy SFT model
    with the current grpo.py and with the one of the commit before the options
    (tests/golden/grpo_defaults.py:BASELINE, unpacked from git), one thread each, on this machine;
    every logged number and every final weight equal."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    import grpo_defaults

    baseline = grpo_defaults.checkout(grpo_defaults.BASELINE, tmp_path / "baseline")
    if baseline is None:
        pytest.skip(f"needs git history with commit {grpo_defaults.BASELINE} (a shallow clone lacks it)")
    for name in grpo_defaults.RUNS:
        old = grpo_defaults.record(baseline, toy_dir, toy_sft, name, tmp_path / f"{name}-old")
        now = grpo_defaults.record(ROOT, toy_dir, toy_sft, name, tmp_path / f"{name}-now")
        assert now["weights"] == old["weights"], name
        assert len(now["metrics"]) == len(old["metrics"]) == 4
        for new, was in zip(now["metrics"], old["metrics"]):
            assert {k: new[k] for k in was} == was, (name, new["step"])  # new metrics may be added, none changed
