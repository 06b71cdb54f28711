"""Model families (mmr1/families.py): the adapter's facts checked against tiny random models of each
family built from config (`data.toy.build_toy_model(..., family=F)`), and Qwen2-VL and Qwen3-VL run
end to end on the CPU paths: packed log-probs equal the padded and naive ones, the door counts the
tokens the processor makes, the GPU kernels' logic (CPU stand-in), SFT (packed), one GRPO step (HF
engine, packed), FSDP2 under torchrun x2 and eval; Qwen3.5 (hybrid linear attention) refused packing
and the CPU vLLM engine in one line, run with --no-pack. Qwen2.5-VL, the default toy, is covered by
the rest of the suite; it appears here where a fact is compared across families. The vLLM CPU
engine on Qwen3-VL: tests/test_vllm.py."""

import json

import pytest
import torch
from PIL import Image

from conftest import launch, metric_records, run_script
from data import toy
from mmr1 import attention, batches, config, dist, families, logprobs, memory, modeling, vllm_engine
from mmr1.chat import PromptFormat

# fp32 on CPU, as tests/test_packing.py argues: packed, padded and naive runs do the same arithmetic
# on every real token through matmuls of other shapes, so they differ by summation order alone (a
# few fp32 ulps of |log-prob| < 30, ulp 2e-6 at 30); one attended neighbour or one shifted position
# moves a log-prob by >= 1e-2 (test_packing's leak test). Gradients: 1e-5 of the largest entry.
ATOL = 1e-5
PIXELS = {"min_pixels": 3136, "max_pixels": 50176}
END_TO_END = ("qwen2_vl", "qwen3_vl")  # the families run through the stage scripts here


@pytest.fixture(scope="module", params=[f for f in toy.TOY_FAMILIES if families.FAMILIES[f].packs])
def family_toy(request, tmp_path_factory):
    """(family, folder, model, processor) of the toy model of each family that packs."""
    folder = toy.build_toy_model(tmp_path_factory.mktemp(request.param) / "model", seed=0, family=request.param)
    model = modeling.load_model(str(folder), torch.device("cpu"))
    return request.param, folder, model, modeling.load_processor(str(folder), **PIXELS)


def test_the_adapter_knows_each_toy_and_its_on_disk_names(family_toy):
    """Each toy's family, its processor's pixels per image token, and the weight names vLLM reads:
    the names save_pretrained wrote are exactly checkpoint_name of the in-memory ones (the legacy
    layout for Qwen2-VL / Qwen2.5-VL, the in-memory names for Qwen3-VL)."""
    from safetensors import safe_open

    name, folder, model, processor = family_toy
    fam = families.family(model.config)
    assert fam is families.FAMILIES[name] and fam.packs
    assert families.image_factor(processor) == {"qwen2_5_vl": 28, "qwen2_vl": 28, "qwen3_vl": 32}[name]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    in_memory = set(model.state_dict())
    assert {families.checkpoint_name(fam, n) for n in in_memory} == on_disk
    assert (in_memory == on_disk) == (name == "qwen3_vl")  # only Qwen3-VL keeps its in-memory names


def test_an_unsupported_model_type_is_one_line_at_load(tmp_path):
    """A model type outside the adapter stops at load, before any data or weight is read, naming the
    supported families; so does a folder with no readable config."""
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")
    for load in (modeling.load_processor, lambda path: modeling.load_model(path, torch.device("cpu"))):
        with pytest.raises(config.InputError, match=r"^model type 'llava' is not supported; supported families: Qwen2"):
            load(str(tmp_path / "llava"))
    with pytest.raises(config.InputError, match="nowhere: cannot read its model config"):
        families.family_of(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def hybrid_toy(tmp_path_factory):
    """The Qwen3.5 toy (Gated-DeltaNet linear attention in layers 0-2), loaded on CPU."""
    folder = toy.build_toy_model(tmp_path_factory.mktemp("qwen3_5") / "model", seed=0, family="qwen3_5")
    return folder, modeling.load_model(str(folder), torch.device("cpu")), modeling.load_processor(str(folder), **PIXELS)


def test_hybrid_linear_attention_is_refused_packing_in_one_line(hybrid_toy, toy_dir, tmp_path):
    """Why Qwen3.5 is refused packing: on a packed row its linear-attention layers carry their state
    from one sequence into the next (the padded log-probs equal the naive ones; the packed ones are
    off by far more than summation order), with no error from transformers. So sft.py / grpo.py stop
    in one line naming --no-pack, and run with it (grpo: one step, HF engine); the vLLM engine on a
    CPU stops in one line before vLLM starts (the CPU build refuses its cache without chunked prefill)."""
    folder, model, processor = hybrid_toy
    assert not families.family(model.config).packs
    inputs, _ = rl_micro_batch(processor)
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        naive, _ = logprobs.naive_token_logprobs(model, inputs)
        padded, _ = logprobs.token_logprobs(model, inputs, packed=False)
        packed, _ = logprobs.token_logprobs(model, inputs, packed=True)
    assert torch.allclose(padded[valid], naive[valid], atol=ATOL)
    first = inputs["attention_mask"][0].sum() - 1  # the first sequence's targets see no neighbour: equal
    assert torch.allclose(packed[0, :first], padded[0, :first], atol=ATOL)
    assert (packed - padded)[valid].abs().max() > 1e-3  # measured 0.035 nats on this toy
    data = toy_dir / "data"
    proc = launch(["sft.py", "--model", str(folder), "--data", f"{data / 'sft'}@train",
                   "--output-dir", str(tmp_path / "sft")])  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {folder} is Qwen3.5: its linear-attention layers would carry state across the sequences of a "
        "packed row; run with --no-pack"
    )
    run_script(["grpo.py", *grpo_args(folder, data, tmp_path / "grpo"), "--no-pack"])
    with pytest.raises(config.InputError, match="vLLM's CPU build needs chunked prefill .* use --engine hf on a CPU$"):
        vllm_engine.VLLMEngine(str(folder), processor, dist.Dist(0, 1, 0, torch.device("cpu")), **PIXELS)
    (step,) = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert step["rollout/generated_responses"] == 8 and all(v == v for v in step.values())  # no NaN


@pytest.mark.parametrize("size", [(112, 112), (640, 480), (90, 300), (1000, 200)])
def test_the_door_counts_the_tokens_the_processor_makes(family_toy, size):
    """The door's token count (image headers only, no decoding) equals the decoded prompt's for
    each family's patch, and the image is resized once: to multiples of patch x merge, which the
    processor's own resize then keeps (its grid x patch is the image's size)."""
    name, _, _, processor = family_toy
    image = Image.new("RGB", size, (200, 30, 30))
    row = {"problem": "<image>How many red squares are there?", "images": [image]}
    decoded = batches.build_prompt(processor, row, PromptFormat(), **PIXELS)  # the processor's own pixel range
    counted = batches.build_prompt(processor, row, PromptFormat(), **PIXELS, decode=False)
    assert counted.ids == decoded.ids
    factor, patch = families.image_factor(processor), processor.image_processor.patch_size
    (w, h) = decoded.images[0].size
    assert w % factor == 0 and h % factor == 0
    assert decoded.image_grid_thw[0].tolist() == [1, h // patch, w // patch]
    assert decoded.ids.count(processor.image_token_id) == (w // factor) * (h // factor)


def rl_micro_batch(processor):
    """Three sequences of very different lengths, with 2, 1 and 0 images."""
    grids = [toy.draw_grid(["red", "blue", "green", "yellow"]), toy.draw_grid(["blue", "red", "red", "green"])]
    rows = [
        {"problem": "<image>" * k + q, "images": grids[:k]} for k, q in zip([2, 1, 0], ["Compare.", "Hi", "Count?"])
    ]
    ids = processor.tokenizer.encode("the answer is four because I count", add_special_tokens=False)
    prompts = batches.build_prompts(processor, rows, PromptFormat(), **PIXELS)
    return batches.rl_batch(processor, prompts, [ids * 30, ids[:1], ids * 6])


def test_packed_logprobs_equal_padded_and_naive(family_toy, monkeypatch):
    """Per family: packed log-probs and entropies equal the padded chunked ones and the naive
    definition on every real target, and the gradients of a GRPO-like loss equal the padded ones;
    the packed forward builds no (N, N) mask (attention.packed_row_mask returns None for it)."""
    import transformers.masking_utils as masking

    _, _, model, processor = family_toy
    inputs, mask = rl_micro_batch(processor)
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    with torch.no_grad():
        naive, naive_entropy = logprobs.naive_token_logprobs(model, inputs, temperature=0.6)
    results, calls, sdpa_mask = {}, [], masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda **kw: calls.append(kw) or sdpa_mask(**kw))
    for packed in (False, True):
        calls.clear()
        model.zero_grad()
        logp, ent = logprobs.token_logprobs(model, inputs, chunk_size=64, entropy=True, temperature=0.6, packed=packed)
        (-(logp * mask).sum() / mask.sum()).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[packed] = (logp.detach(), ent, grad, len(calls))
    model.zero_grad()
    (padded, padded_entropy, padded_grad, padded_masks), (logp, ent, grad, packed_masks) = results[False], results[True]
    assert torch.allclose(logp[valid], naive[valid], atol=ATOL) and torch.allclose(
        logp[valid], padded[valid], atol=ATOL
    )
    assert torch.allclose(ent[valid], naive_entropy[valid], atol=1e-4)  # as test_logprobs: a sum over the vocabulary
    assert torch.allclose(ent[valid], padded_entropy[valid], atol=1e-4)
    assert (logp[~valid] == 0).all()
    assert torch.allclose(grad, padded_grad, atol=ATOL * padded_grad.abs().max(), rtol=0)
    assert padded_masks > 0 and packed_masks == 0  # the padded batch needs its padding mask; the packed row none


def test_gpu_kernels_per_family(family_toy, monkeypatch):
    """The GPU path without flash-attn, through test_gpu_path's CPU stand-in for torch's varlen
    kernel, on each family: the vision attention (one fused call per block) equals the family's own
    per-image attention, and packed log-probs through torch_varlen (one causal call per text layer,
    the sequences' boundaries as cu_seqlens) equal the padded ones under bf16 autocast (test_gpu_path's
    tolerances, argued there)."""
    import torch.nn.attention.varlen as varlen
    from test_gpu_path import BF16_ATOL, BF16_VISION_RTOL, sdpa_per_segment
    from transformers import AutoModelForImageTextToText

    name, folder, stock, processor = family_toy
    attention.register_packed_attention()
    fast = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attention.TORCH_VARLEN)
    attention.use_vision_varlen(fast)  # what load_model does for TORCH_VARLEN
    calls = []
    monkeypatch.setattr(varlen, "varlen_attn", sdpa_per_segment(calls))
    vision = fast.config.vision_config
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])  # two images, 64 and 24 patches
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(88, patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock.model.visual(pixels, grid_thw=grid).pooler_output.float()
        got = fast.model.visual(pixels, grid_thw=grid).pooler_output.float()
    assert len(calls) == vision.depth  # one call per block
    if name != "qwen2_5_vl":  # no windows: every block attends within whole images
        assert all(c["cu_q"] == [0, 64, 88] for c in calls)
    assert torch.allclose(got, expected, atol=BF16_VISION_RTOL * expected.abs().max(), rtol=0)
    inputs, _ = rl_micro_batch(processor)
    lengths = inputs["attention_mask"].sum(1).tolist()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded, _ = logprobs.token_logprobs(fast, inputs, chunk_size=64, packed=False)
        calls.clear()
        packed, _ = logprobs.token_logprobs(fast, inputs, chunk_size=64, packed=True)
    text_calls = [c for c in calls if c["window"] == (-1, 0)]
    bounds = [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert len(text_calls) == fast.config.text_config.num_hidden_layers and all(c["cu_q"] == bounds for c in text_calls)
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    assert torch.allclose(packed[valid], padded[valid], atol=BF16_ATOL, rtol=0)


def test_memory_plan_reads_each_family_from_its_config():
    """The plan's parameter count of Qwen3-VL-8B (published sizes) is that of the model built on the
    meta device within 0.05% (the plan leaves out a few norms' biases and the learned vision position
    table: 2.5M of 8.77B); the toys' counts are as close."""
    from transformers import Qwen3VLForConditionalGeneration

    config = families.qwen3_vl_8b_config()
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    real = sum(p.numel() for p in model.parameters())
    assert round(real / 1e9, 2) == 8.77  # the published size
    assert abs(memory.parameter_counts(memory.shapes(config))["total"] / real - 1) < 5e-4
    assert memory.plan(config, memory.CARDS_GIB["80GB"])["params (B)"] == pytest.approx(real / 1e9, rel=5e-4)


# ---------------------------------------------------------------------------------------------
# End to end: the stage scripts on Qwen2-VL and Qwen3-VL toys (packed, HF engine)
# ---------------------------------------------------------------------------------------------


def grpo_args(model, data, out) -> list[str]:
    """One GRPO step of 2 prompts x 4 responses of up to 8 tokens, HF engine, no validation."""
    return ["--model", str(model), "--data", f"{data / 'rl'}@train", "--output-dir", str(out), "--max-steps", "1",
            "--train-limit", "8", "--rollout-batch-size", "2", "--group-size", "4", "--max-response-length", "8",
            "--val-limit", "0", "--reward-workers", "1", "--lr", "1e-3"]  # fmt: skip


@pytest.mark.parametrize("family", END_TO_END)
def test_sft_grpo_eval_end_to_end(family, toy_dir, tmp_path):
    """SFT (2 packed steps), one GRPO step from its model (HF engine, packed reference and update
    passes) and eval of the result on a local ChartQA file, each a real stage-script run on the
    family's toy; Qwen2-VL's SFT and Qwen3-VL's GRPO step under torchrun x2 (FSDP2 over gloo). The
    trained weights move and stay of the family."""
    from test_eval import local_benchmarks

    init = toy.build_toy_model(tmp_path / "init", seed=0, family=family)
    data = toy_dir / "data"
    run_script(["sft.py", "--model", str(init), "--data", f"{data / 'sft'}@train", "--output-dir", str(tmp_path / "sft"),
                "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--acc-limit", "-1",
                "--lr", "2e-3"], torchrun=2 if family == "qwen2_vl" else 0)  # fmt: skip
    run_script(["grpo.py", *grpo_args(tmp_path / "sft" / "final", data, tmp_path / "grpo")],
               torchrun=2 if family == "qwen3_vl" else 0)  # fmt: skip
    (step,) = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and step["rollout/generated_responses"] == 8
    assert all(v == v for v in step.values())  # no NaN
    before = modeling.load_model(str(init), torch.device("cpu")).state_dict()
    trained = modeling.load_model(str(tmp_path / "grpo" / "final"), torch.device("cpu"))
    assert families.family(trained.config) is families.FAMILIES[family]
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    chartqa = next(spec for spec in local_benchmarks(tmp_path).split(",") if spec.startswith("chartqa="))
    run_script(["eval.py", "--model", str(tmp_path / "grpo" / "final"), "--benchmarks", "chartqa",
                "--bench-data", chartqa, "--engine", "hf", "--max-new-tokens", "4",
                "--min-pixels", "3136", "--max-pixels", "50176", "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    (results,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"].values()
    assert results["chartqa"]["n"] == 2


@pytest.mark.parametrize("family", END_TO_END)
def test_a_resumed_run_equals_the_uninterrupted_one(family, toy_dir, tmp_path):
    """Resume on the families other than Qwen2.5-VL (tests/test_checkpoint.py has its own): GRPO on the
    family's toy stopped after step 1 (--stop-after, a checkpoint at step-1) and resumed to step 2 ends
    with the uninterrupted run's weights and metrics bit for bit (CPU, fp32: the same operations in the
    same order)."""
    from safetensors.torch import load_file

    init = toy.build_toy_model(tmp_path / "init", seed=0, family=family)
    common = ["--model", str(init), "--data", f"{toy_dir / 'data' / 'rl'}@train", "--max-steps", "2",
              "--train-limit", "8", "--rollout-batch-size", "2", "--group-size", "4", "--max-response-length", "8",
              "--val-limit", "0", "--reward-workers", "0", "--lr", "1e-3", "--save-every", "1"]  # fmt: skip
    run_script(["grpo.py", *common, "--output-dir", str(tmp_path / "full")])
    run_script(["grpo.py", *common, "--output-dir", str(tmp_path / "cut"), "--stop-after", "1"])
    run_script(["grpo.py", *common, "--output-dir", str(tmp_path / "cut"), "--resume"])

    def weights(run):
        return load_file(str(tmp_path / run / "final" / "model.safetensors"))

    full, cut = weights("full"), weights("cut")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    full_records, cut_records = metric_records(tmp_path / "full"), metric_records(tmp_path / "cut")
    assert full_records == cut_records and [r["step"] for r in cut_records] == [1, 2]
