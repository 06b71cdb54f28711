"""rollout.py: the HF engine on the toy model, and the GPU-only side of the vLLM adapter (sleep mode,
the wake / push / wake sequence) against a recording stand-in for the vllm package. The vLLM engine
itself runs for real, on its CPU build, in tests/test_vllm.py."""

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from data import toy
from mmr1 import dist, modeling, rollout


def toy_rows(n=3):
    return [
        {"problem": "<image>How many red squares are there?", "images": [toy.draw_grid(["red"] * 4)], "answer": "4"}
    ] * n


def test_hf_engine_shapes_order_seeds_and_stops(toy_model):
    model, processor = toy_model
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    engine = rollout.HFEngine(model, processor, d, min_pixels=3136, max_pixels=50176, batch_size=4)
    sampling = rollout.Sampling(temperature=1.0, max_new_tokens=6, seed=3)
    outs = engine.generate(toy_rows(3), 2, sampling)
    assert [o.row for o in outs] == [0, 0, 1, 1, 2, 2]  # row-major, n per row
    again = engine.generate(toy_rows(3), 2, sampling)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]  # seeded
    other = engine.generate(toy_rows(3), 2, rollout.Sampling(temperature=1.0, max_new_tokens=6, seed=4))
    assert [o.token_ids for o in outs] != [o.token_ids for o in other]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    forbidden = set(rollout.forbidden_token_ids(processor.tokenizer))
    assert len(forbidden) == 5
    for o in outs:
        assert not forbidden & set(o.token_ids)
        assert (o.finish_reason == "stop") == (o.token_ids[-1:] == [end])
        assert o.finish_reason == "stop" or len(o.token_ids) == 6
    greedy = engine.generate(toy_rows(2), 1, rollout.Sampling(temperature=0.0, max_new_tokens=6))
    assert greedy[0].token_ids == greedy[1].token_ids


@dataclass
class FakeCompletion:
    token_ids: list
    text: str
    finish_reason: str


def install_fake_vllm(monkeypatch, log):
    fake = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            log.append(("LLM", kwargs))
            self.llm_engine = types.SimpleNamespace(
                reset_encoder_cache=lambda: log.append(("reset_encoder_cache",)),
                engine_core=types.SimpleNamespace(shutdown=lambda: log.append(("shutdown",))),
            )

        def generate(self, prompts, params, use_tqdm=False):
            params = params if isinstance(params, list) else [params] * len(prompts)  # one per prompt, or shared
            log.append(("generate", prompts, [p.kwargs for p in params]))
            return [types.SimpleNamespace(outputs=[FakeCompletion([5, 6], "a", "stop"), FakeCompletion([7] * 3, "b", "length")][: p.kwargs["n"]])
                    for p in params]  # fmt: skip

        def collective_rpc(self, method, kwargs):
            log.append(
                ("rpc", method, [(n, t.dtype) for n, t in kwargs["weights_iterator"]], kwargs["is_checkpoint_format"])
            )

        def reset_prefix_cache(self):
            log.append(("reset_prefix_cache",))

        def sleep(self, level):
            log.append(("sleep", level))

        def wake_up(self, tags):
            log.append(("wake_up", tuple(tags)))

    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)


def test_vllm_adapter_calls(monkeypatch, toy_model, toy_dir):
    model, processor = toy_model
    log = []
    install_fake_vllm(monkeypatch, log)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored to absent afterwards, whatever the engine sets
    d = dist.Dist(1, 2, 1, torch.device("cuda", 1))  # the GPU arguments; nothing here touches a device
    engine = rollout.make_engine("vllm", model, processor, d, model_path=str(toy_dir / "model"), min_pixels=3136,
                                 max_pixels=50176, gpu_memory_utilization=0.5, max_model_len=512)  # fmt: skip
    import os

    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
    name, kwargs = log[0]
    assert name == "LLM" and kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["enable_sleep_mode"] and kwargs["tensor_parallel_size"] == 1 and kwargs["seed"] == 1
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["max_model_len"] == 512
    rows = toy_rows(2) + [{"problem": "text only", "answer": "1"}]
    outs = engine.generate(rows, 2, rollout.Sampling(temperature=0.6, max_new_tokens=9, seed=2))
    _, prompts, per_prompt = log[1]
    params = per_prompt[0]
    assert prompts[0]["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert len(prompts[0]["multi_modal_data"]["image"]) == 1 and "multi_modal_data" not in prompts[2]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert params["n"] == 2 and params["max_tokens"] == 9 and params["stop_token_ids"] == [end]
    assert [p["seed"] for p in per_prompt] == [dist.derive_seed(2, "rank", 1, row) for row in range(3)]  # one per row
    assert all(v < -50 for v in params["logit_bias"].values())
    assert params["top_k"] == 0 and params["repetition_penalty"] == 1.0 and kwargs["generation_config"] == "vllm"
    assert params["logprobs"] is None and all(o.logprobs is None for o in outs)  # asked only by training rollouts
    engine.generate(rows[:1], 1, rollout.Sampling(max_new_tokens=9, seed=2, logprobs=True))
    assert log[2][2][0]["logprobs"] == 0  # the sampled token's own log-prob, nothing more
    del log[2]
    assert [(o.row, o.token_ids, o.finish_reason) for o in outs[:2]] == [
        (0, [5, 6, end], "stop"),
        (0, [7, 7, 7], "length"),
    ]
    log.clear()
    engine.sleep()
    engine.sleep()  # idempotent
    engine.push_weights(model, version=1)
    names = [entry[0] for entry in log]
    assert names == ["sleep", "wake_up", "rpc", "reset_prefix_cache", "reset_encoder_cache", "wake_up"]
    assert log[1][1] == ("weights",) and log[5][1] == ("kv_cache",)
    rpc = log[2]
    assert rpc[1] == "reload_weights" and rpc[3] is True
    from safetensors.torch import load_file

    on_disk = load_file(str(toy_dir / "model" / "model.safetensors"))  # what save_pretrained wrote
    assert sorted(n for n, _ in rpc[2]) == sorted(on_disk) and {t for _, t in rpc[2]} == {torch.bfloat16}
    log.clear()
    engine.sleep()
    engine.push_weights(model, version=1)  # the same weights again (a validation after the step): no push
    assert [entry[0] for entry in log] == ["sleep", "wake_up", "wake_up"] and engine.pushes == 1
    engine.close()
    assert log[-1] == ("shutdown",) and engine.llm is None


def test_score_responses_without_a_pool_stays_in_process(monkeypatch):
    import reward

    def no_worker(*args, **kwargs):
        raise AssertionError("no worker process may be started when no pool is given (--reward-workers 0)")

    monkeypatch.setattr(reward.RewardPool, "_start", no_worker)
    rows = [{"answer": "4"}, {"answer": "B", "choices": ["x", "y"]}]
    texts = ["<think>t</think><answer>\\boxed{4}</answer>", "<think>t</think><answer>\\boxed{y}</answer>", "\\boxed{A}"]
    scores = reward.score_responses(texts, [rows[0], rows[1], rows[1]], reward.Scoring(format_weight=0.5))
    assert [(s["format"], s["accuracy"], s["overall"]) for s in scores] == [(1, 1, 1.5), (1, 1, 1.5), (0, 0, 0)]


def test_hf_engine_ignores_the_checkpoints_sampling_defaults(toy_dir, tmp_path, toy_model):
    """A checkpoint whose generation_config.json carries Qwen2.5-VL's shipped knobs (repetition_penalty
    1.05, top_k 1, top_p 0.001, temperature 0.01) samples exactly as one without it: every knob
    comes from Sampling."""
    import shutil

    from transformers import GenerationConfig

    ckpt = tmp_path / "shipped"
    shutil.copytree(toy_dir / "model", ckpt)
    GenerationConfig(do_sample=True, repetition_penalty=1.05, top_k=1, top_p=0.001, temperature=0.01).save_pretrained(
        ckpt
    )
    _, processor = toy_model
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    plain, shipped = (modeling.load_model(str(p), d.device) for p in (toy_dir / "model", ckpt))
    assert shipped.generation_config.top_k == 1 and shipped.generation_config.repetition_penalty == 1.05
    sampling = rollout.Sampling(temperature=1.0, max_new_tokens=10, seed=3)

    def tokens(model):
        engine = rollout.HFEngine(model, processor, d, min_pixels=3136, max_pixels=50176)
        return [o.token_ids for o in engine.generate(toy_rows(2), 4, sampling)]

    assert tokens(shipped) == tokens(plain)
    assert len({tuple(t) for t in tokens(plain)}) > 1  # really sampled: top_k 1 would give one answer
    assert shipped.generation_config.top_k == 1  # restored after the call


def test_make_engine_refuses_an_unknown_vllm_option():
    """The vLLM options pass through **vllm_options; a misspelt one is an error for either engine, not
    silently dropped by the HF engine (which takes none of them)."""
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    with pytest.raises(TypeError, match=r"unknown vLLM option\(s\) \['max_model_length'\]"):
        rollout.make_engine("hf", None, None, one, model_path="m", min_pixels=1, max_pixels=2, max_model_length=8)
