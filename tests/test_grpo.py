"""grpo.py: the GRPO math on hand-made tensors, gradient aggregation, and end-to-end toy runs."""

import dataclasses
import json
import math
import re

import pytest
import torch

import grpo
from conftest import ROOT, run_script
from mmr1 import batches, chat, config, dist, logprobs


def documented_metrics() -> set[str]:
    """The names docs/grpo.md's "Metrics" table explains, but those logged only with a flag
    (train/skipped_nonfinite) or on CUDA (perf/mfu*): every one must be in a CPU run's metrics.jsonl."""
    table = (ROOT / "docs" / "grpo.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = {n for line in table.splitlines() for n in re.findall(r"`([a-z]+/[a-z0-9_]+)`", line.split(" | ")[0])}
    return names - {"train/skipped_nonfinite", "perf/mfu", "perf/mfu_update"}


METRICS = documented_metrics()


def test_group_advantages_hand_computed():
    rewards = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv, zero_var = grpo.group_advantages(rewards, n=4, eps=0.0)
    std = math.sqrt(((1.0) ** 2 + 0 + 1.0 + 0) / 3)  # unbiased std of [2, 1, 0, 1], mean 1
    assert torch.allclose(adv[:4], torch.tensor([1 / std, 0.0, -1 / std, 0.0]))
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-variance group: no signal
    assert zero_var.tolist() == [False, True]
    adv, zero_var = grpo.group_advantages(torch.tensor([0.0, 0.0, 2.0, 2.0]), n=2)
    assert torch.equal(adv, torch.zeros(4)) and zero_var.all()
    adv, _ = grpo.group_advantages(torch.tensor([1.0, 0.0]), n=2, eps=1e-6)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-6))  # mean 0.5, std sqrt(0.5)


def test_k3_kl_value_and_sign():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -3.0])
    d = ref - logp
    assert torch.allclose(grpo.k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert grpo.k3_kl(logp, ref)[0] == 0 and (grpo.k3_kl(logp, ref) >= 0).all()
    assert torch.isclose(grpo.k3_kl(torch.tensor(0.0), torch.tensor(math.log(2.0))), torch.tensor(1 - math.log(2.0)))
    # mean of k3 under samples from pi estimates KL(pi || ref)
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    estimate = grpo.k3_kl(p.log()[x], q.log()[x]).mean()
    assert abs(estimate - (p * (p / q).log()).sum()) < 0.01


def test_k3_kl_is_clamped_as_the_recipe():
    """One token whose reference log-prob is 20 nats above the policy's would give exp(20) ~ 5e8;
    the recipe clamps each token's k3 to [-10, 10]."""
    logp = torch.tensor([-30.0, -5.0, -1.0])
    ref = torch.tensor([-10.0, -4.0, -1.0])
    kl = grpo.k3_kl(logp, ref)
    assert kl[0] == grpo.KL_CLAMP == 10.0
    assert torch.isclose(kl[1], torch.tensor(math.exp(1.0) - 2.0)) and kl[2] == 0


def test_reference_and_old_logprobs_use_the_rollout_temperature(toy_model):
    """The log-prob the loss uses for a sampled token is log softmax(logits / T) at that token."""
    model, processor = toy_model
    row = {
        "problem": "<image>How many red squares are there?",
        "images": [__import__("data.toy").toy.draw_grid(["red"] * 4)],
    }
    inputs, mask = batches.rl_batch(
        processor, batches.build_prompts(processor, [row, row], chat.PromptFormat(), 3136, 50176), [[5, 6, 7], [8]]
    )
    cfg = grpo.GRPOConfig(temperature=0.6)
    (logp,) = grpo.frozen_token_logprobs(model, [{"inputs": inputs}], cfg, dist.Dist(0, 1, 0, torch.device("cpu")))
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
    naive = (logits / 0.6).log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    at_t1 = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    m = mask.bool()
    assert torch.allclose(logp[m], naive[m], atol=1e-5) and not torch.allclose(logp[m], at_t1[m], atol=1e-2)


def test_clipped_surrogate_and_clip_fraction():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 1.1, 1.5, 0.9]]))  # ratios 0.5, 1.1, 1.5, 0.9
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([[1.0]]), 0.2, 0.2)
    # A > 0: min(r, clip(r)) objective -> loss -min(...); clipped above 1.2 only
    assert torch.allclose(loss, torch.tensor([[-0.5, -1.1, -1.2, -0.9]]))
    assert clipped.tolist() == [[False, False, True, False]]
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([[-2.0]]), 0.1, 0.3)
    # A < 0: loss = max(2r, 2 clip(r, 0.9, 1.3)); clipped below 0.9 only
    assert torch.allclose(loss, torch.tensor([[1.8, 2.2, 3.0, 1.8]]))
    assert clipped.tolist() == [[True, False, False, False]]


def test_token_mean_over_ranks_equals_single_process(toy_model):
    """Two 'ranks' with unequal token counts, each dividing its token sum by the GLOBAL token count
    and FSDP2 summing their gradients (divide factor 1, see modeling.shard_model), give the
    single-process full-batch gradient."""
    model, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [__import__("data.toy").toy.draw_grid(["red"] * 4)],
             "answer": "4"}] * 4  # fmt: skip
    responses = [[5, 6, 7], [8, 9], [5, 6, 7, 8, 9, 10], [11]]
    cfg = grpo.GRPOConfig(kl_coef=0.0)
    adv = torch.tensor([1.0, -0.5, 0.3, -2.0])

    def micro(idx):
        inputs, mask = batches.rl_batch(
            processor,
            batches.build_prompts(processor, [rows[i] for i in idx], chat.PromptFormat(), 3136, 50176),
            [responses[i] for i in idx],
        )
        return {"inputs": inputs, "response_mask": mask, "advantages": adv[idx]}

    def grads_of(parts):
        model.zero_grad()
        total = sum(float(p["response_mask"].sum()) for ps in parts for p in ps)
        for ps in parts:  # each rank: its own micro-batches, loss = token sum / global tokens
            for p in ps:
                logp, _ = logprobs.token_logprobs(model, p["inputs"], temperature=cfg.temperature)
                pg, _ = grpo.clipped_surrogate(logp, logp.detach(), p["advantages"][:, None], 0.2, 0.2)
                ((pg * p["response_mask"]).sum() / total).backward()
        g = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])  # FSDP2: sum over ranks
        model.zero_grad()
        return g

    single = grads_of([[micro([0, 1, 2, 3])]])
    two_ranks = grads_of([[micro([0]), micro([1])], [micro([2, 3])]])
    assert torch.allclose(single, two_ranks, atol=1e-6)
    # and the loss helper itself (one process) matches the hand-written aggregation
    model.zero_grad()
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    grpo.policy_loss_backward(model, [micro([0, 1]), micro([2, 3])], cfg, d)
    helper = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    model.zero_grad()
    assert torch.allclose(helper, single, atol=1e-6)


def test_rl_batch_masks_exactly_the_response(toy_model):
    _, processor = toy_model
    from data import toy

    rows = [
        {"problem": "<image>Q?", "images": [toy.draw_grid(["red"] * 4)]},
        {"problem": "Longer question here?", "images": []},
    ]
    inputs, mask = batches.rl_batch(
        processor, batches.build_prompts(processor, rows, chat.PromptFormat(), 3136, 50176), [[3, 4, 5], [6]]
    )
    for b, resp in enumerate([[3, 4, 5], [6]]):
        targets = inputs["input_ids"][b, 1:]
        assert targets[mask[b].bool()].tolist() == resp
        assert inputs["attention_mask"][b].sum() == mask[b].sum() + (inputs["attention_mask"][b].sum() - len(resp))
    assert int(inputs["mm_token_type_ids"].sum()) == 16 and inputs["image_grid_thw"].shape == (1, 3)


def test_paper_preset_is_table_6():
    cfg = config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    expected = dict(lr=1e-6, kl_coef=0.01, clip_low=0.2, clip_high=0.2, max_grad_norm=1.0, group_size=8, temperature=0.6,
                    top_p=1.0, max_prompt_length=2048, max_response_length=4096, rollout_batch_size=512,
                    micro_batch_size=8, updates_per_batch=1, episodes=10.0, weight_decay=0.01, vas_mix_ratio=0.5, vas_alpha=0.8,
                    vas_beta=0.2, vas_update_every=56, vas_rollouts=16, min_pixels=7056, max_pixels=1048576,
                    gpu_memory_utilization=0.0, val_temperature=0.5, instruction="recipe")  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert chat.INSTRUCTIONS[cfg.instruction] == chat.RL_INSTRUCTION  # Table 7, before every problem
    assert grpo.GRPOConfig().instruction == ""  # the toy keeps its own format
    explicit = config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--preset", "paper", "--lr", "3e-6"])
    assert explicit.lr == 3e-6 and explicit.kl_coef == 0.01
    fields = {f.name for f in dataclasses.fields(grpo.GRPOConfig)}
    assert {"vas", "vas_online", "vas_mix_ratio", "vas_alpha", "vas_beta", "vas_update_every", "vas_rollouts",
            "vas_tds", "engine", "resume", "seed", "val_data", "output_dir", "max_steps"} <= fields  # fmt: skip


def test_no_signal_watch_says_so_once_and_only_for_a_dead_start():
    """Every group of the first NO_SIGNAL_STEPS steps without signal: one line, at that step, naming the
    causes and the flags that help; a step with one group with signal silences it for the run."""
    cfg, n = grpo.GRPOConfig(group_size=4), grpo.NO_SIGNAL_STEPS
    dead = {"vas/zero_var_frac": 1.0, "reward/accuracy": 0.0}
    alive = {"vas/zero_var_frac": 0.75, "reward/accuracy": 0.2}
    watch = grpo.NoSignalWatch()
    said = [watch.update(dead, cfg) for _ in range(3 * n)]
    assert [i for i, line in enumerate(said) if line is not None] == [n - 1]
    line = said[n - 1]
    assert "\n" not in line and "mean accuracy 0.00" in line and "too weak" in line and "too strong" in line
    assert all(flag in line for flag in ("--group-size 4", "--temperature", "--dynamic-sampling", "--vas", "--model"))
    watch = grpo.NoSignalWatch()
    assert watch.update(dead, cfg) is None and watch.update(alive, cfg) is None
    assert all(watch.update(dead, cfg) is None for _ in range(3 * n))  # signal was seen: never said


def grpo_args(toy_dir, out, steps, *extra):
    data = toy_dir / "data" / "rl"
    return ["grpo.py", "--model", str(toy_dir / "model"), "--data", f"{data}@train", "--val-data", f"{data}@val",
            "--output-dir", str(out), "--max-steps", str(steps), "--train-limit", "16", "--rollout-batch-size", "4",
            "--group-size", "4", "--max-response-length", "12", "--val-limit", "8", "--val-every", "2", "--vas-rollouts", "2",
            "--vas-update-every", "1", "--reward-workers", "1", "--lr", "1e-3", *extra]  # fmt: skip


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("vas_flags", [[], ["--vas", "--vas-online"]])
def test_grpo_script_logs_every_metric(toy_dir, tmp_path, vas_flags):
    from transformers import Qwen2_5_VLForConditionalGeneration

    run = run_script(grpo_args(toy_dir, tmp_path / "run", 3, *vas_flags))
    # the untrained toy's groups never have signal: after NO_SIGNAL_STEPS steps the run says so, once
    said = [line for line in run.stdout.splitlines() if "no signal:" in line]
    assert grpo.NO_SIGNAL_STEPS <= 3 and len(said) == 1 and "--group-size 4" in said[0]
    lines = metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == [0, 1, 2, 3] and list(lines[0]) == ["step", "time", "val/accuracy"]
    seen = set().union(*lines)
    assert METRICS <= seen and len(METRICS) > 30  # the table parsed (34 names), not an empty set
    assert all(math.isfinite(v) for r in lines for v in r.values())
    assert lines[1]["vas/weighted_frac"] == (0.5 if vas_flags else 0.0)
    # generated by the end of each step: 4 prompts x 4 per step, plus (VAS) 16 prompts x 2 before step 1
    # and again in the refreshes of steps 1 and 2 (none after the last step)
    scoring = 16 * 2 if vas_flags else 0
    assert [r["rollout/generated_responses"] for r in lines[1:]] == [
        2 * scoring + 16,
        3 * scoring + 32,
        3 * scoring + 48,
    ]
    assert lines[1]["rollout/generated_tokens"] >= 16 * lines[1]["rollout/response_len"] - 1e-6
    if vas_flags:
        import vas

        refreshes = vas.load_refreshes(tmp_path / "run")
        assert [r["step"] for r in refreshes] == [0, 1, 2] and len(refreshes[0]["vps"]) == 16
        assert vas.plot_refreshes(tmp_path / "run").stat().st_size > 1000  # the Figure 3 PNG
    Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")


def test_grpo_torchrun_two_ranks_with_vas(toy_dir, tmp_path):
    run_script(grpo_args(toy_dir, tmp_path / "run", 2, "--vas", "--gradient-checkpointing"), torchrun=2)
    lines = metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == [0, 1, 2] and METRICS <= set().union(*lines)


def test_policy_loss_packed_by_token_budget_equals_padded(toy_model):
    """policy_loss_backward over packed micro-batches planned by token budget (rl_micro_batches) gives the
    statistics and gradient of right-padded fixed-count micro-batches: the loss is the token mean
    over the whole batch however its sequences are grouped (fp32; tolerance as in test_packing)."""
    model, processor = toy_model
    from data import toy

    rows = [{"problem": "<image>How many red squares are there?", "images": [toy.draw_grid(["red"] * 4)]},
            {"problem": "Text only."},
            {"problem": "<image><image>Same?", "images": [toy.draw_grid(["red"] * 4), toy.draw_grid(["blue"] * 4)]}]  # fmt: skip
    words = processor.tokenizer.encode("four red squares so the answer is", add_special_tokens=False)
    which = [0, 0, 1, 1, 2, 2]
    responses = [(words * 20)[:n] for n in (90, 3, 40, 1, 120, 7)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    ref_shift = torch.linspace(-0.3, 0.3, 200)  # a reference log-prob that differs from the policy's
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    results = {}
    for pack in (False, True):
        cfg = grpo.GRPOConfig(pack=pack, kl_coef=0.1, max_tokens_per_micro_batch=150 if pack else 0, micro_batch_size=4)
        micro = []
        prompts = batches.build_prompts(processor, [rows[i] for i in which], chat.PromptFormat(), 3136, 50176)
        for idx, inputs, mask in batches.rl_micro_batches(processor, prompts, responses, cfg.max_tokens_per_micro_batch,
                                                         cfg.micro_batch_size, d):  # fmt: skip
            micro.append({"inputs": inputs, "response_mask": mask, "advantages": adv[idx]})
        if not pack:
            assert [len(b["advantages"]) for b in micro] == [4, 2]  # fixed count, in order
        for b, ref in zip(micro, grpo.frozen_token_logprobs(model, micro, cfg, d)):
            b["ref_logp"] = ref + ref_shift[: ref.shape[1]]
        model.zero_grad()
        stats = grpo.policy_loss_backward(model, micro, cfg, d)
        grad = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
        model.zero_grad()
        results[pack] = (stats, grad, len(micro))
    assert results[True][2] != results[False][2]  # grouped differently
    for key in ("loss", "pg", "kl", "entropy"):
        assert results[True][0][key] == pytest.approx(results[False][0][key], abs=1e-5), key
    scale = results[False][1].abs().max()
    assert torch.allclose(results[True][1], results[False][1], atol=1e-5 * scale, rtol=0)


def mathvista_file(tmp_path):
    """A MathVista testmini file in its own columns: one unit row, one multiple-choice row."""
    import io

    import datasets

    from data import toy

    buffer = io.BytesIO()
    toy.draw_grid(["red", "blue", "green", "yellow"]).save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    rows = [{"pid": "1", "question": "How heavy?", "decoded_image": image, "choices": None, "answer": "1000",
             "question_type": "free_form", "answer_type": "integer", "precision": None, "unit": "g"},
            {"pid": "2", "question": "Which colour is top-left?", "decoded_image": image, "choices": ["red", "blue"],
             "answer": "red", "question_type": "multi_choice", "answer_type": "text", "precision": None, "unit": None}]  # fmt: skip
    path = tmp_path / "mathvista.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_validation_on_a_benchmark_file_uses_its_rule(tmp_path):
    """--val-benchmark: MathVista rows become prompts and are scored by MathVista's rule: `1000 g` is
    right for gold 1000 with unit g, and `rd` maps to the most similar option, red (its official
    fallback), which reward.py's plain rule does not grant."""
    from mmr1 import benchmarks, rollout

    raw = benchmarks.load_benchmark("mathvista", str(mathvista_file(tmp_path)), 0)
    rows, bad = benchmarks.prompt_rows("mathvista", raw, 3136, 50176)
    assert not bad and [r["id"] for r in rows] == ["1", "2"] and rows[0]["problem"].startswith("<image>")

    class Replies:  # generation is not what is tested here: fixed replies, one per row
        def generate(self, rows, n, sampling):
            texts = {"1": "\\boxed{1000 g}", "2": "\\boxed{rd}"}
            return [rollout.Rollout(i, [1], texts[r["id"]], "stop") for i, r in enumerate(rows)]

    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    rule = grpo.val_scorer(grpo.GRPOConfig(val_benchmark="mathvista"), None)  # the scorer is the caller's
    assert rollout.validation_accuracy(Replies(), rows, d, rollout.Sampling(), rule) == 1.0
    plain = grpo.val_scorer(grpo.GRPOConfig(), None)
    assert rollout.validation_accuracy(Replies(), rows, d, rollout.Sampling(), plain) == 0.5  # reward.py: "rd" != "red"


def test_grpo_validates_on_a_benchmark_file(toy_dir, tmp_path):
    args = grpo_args(toy_dir, tmp_path / "run", 1, "--val-benchmark", "mathvista")
    args[args.index("--val-data") + 1] = str(mathvista_file(tmp_path))
    run_script(args)
    lines = metrics(tmp_path / "run")
    assert [r["step"] for r in lines if "val/accuracy" in r] == [0, 1]
    assert all(r["val/accuracy"] in (0.0, 0.5, 1.0) for r in lines if "val/accuracy" in r)  # 2 rows
