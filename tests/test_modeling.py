"""mmr1.modeling: the toy model loads, runs and saves like the real Qwen2.5-VL."""

import torch

from conftest import prompt_texts
from data import toy
from mmr1 import batches, modeling


def grid_image(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


def test_toy_model_round_trip(toy_dir, toy_model):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_dir / "model")
    processor = AutoProcessor.from_pretrained(toy_dir / "model")
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(toy.SPECIAL_TOKENS) and tok.unk_token_id not in ids.values()
    cfg = model.config
    assert cfg.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids["<|vision_start|>"], ids["<|vision_end|>"])
    for c in (cfg, cfg.text_config):
        assert c.eos_token_id == ids["<|im_end|>"] and c.pad_token_id == ids["<|endoftext|>"]
    assert 2e5 < sum(p.numel() for p in model.parameters()) < 5e6
    # the same weights as the fixture's loader
    for (n, a), (_, b) in zip(model.state_dict().items(), toy_model[0].state_dict().items()):
        assert torch.equal(a, b), n
    row = {"problem": "<image>How many red squares are there?", "images": [grid_image()]}
    texts = prompt_texts(processor, [row])
    assert texts[0].count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert texts[0].endswith("<|im_start|>assistant\n")
    inputs = batches.processor_inputs(processor, texts, [[row["images"][0]]])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 px / 14 = 8 patches a side
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 16  # 64 patches / merge 2x2
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_optimizer_fused_on_cuda_and_autocast_without_weight_cache():
    """The one-GPU 3B launch's two memory terms: AdamW is fused on CUDA (no foreach temporary of
    4 B x params at the step) and foreach on CPU (the numbers the CPU tests pin); the precision
    context keeps no bf16 copy of the fp32 weights (autocast's cache, 2 B x params)."""
    params = [torch.nn.Parameter(torch.ones(3))]
    cuda = modeling.create_optimizer(params, 1e-3, 0.01, torch.device("cuda", 0))
    cpu = modeling.create_optimizer(params, 1e-3, 0.01, torch.device("cpu"))
    assert cuda.defaults["fused"] is True and not cpu.defaults["fused"]
    assert cuda.defaults["betas"] == (0.9, 0.999) and cuda.defaults["weight_decay"] == 0.01
    for device in (torch.device("cuda", 0), torch.device("cpu")):  # (torch turns CUDA autocast off without a GPU)
        context = modeling.autocast(device)
        assert context._cache_enabled is False and context.fast_dtype == torch.bfloat16
    assert modeling.autocast(torch.device("cpu"))._enabled is False  # fp32 on CPU
