"""common.py: toy model round trip, rows -> inputs, data loading, bad rows, label masks, log-probs."""

import io
import json

import pytest
import torch
from PIL import Image

import common
from data import toy


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
    texts = common.prompt_texts(processor, [row])
    assert texts[0].count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert texts[0].endswith("<|im_start|>assistant\n")
    inputs = common.processor_inputs(processor, texts, [[row["images"][0]]])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 px / 14 = 8 patches a side
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 16  # 64 patches / merge 2x2
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_user_content_markers():
    assert common.user_content("<image>Q?", 1) == [{"type": "image"}, {"type": "text", "text": "Q?"}]
    assert common.user_content("A <image> B <image>", 2) == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " B "}, {"type": "image"}
    ]  # fmt: skip
    assert common.user_content("no marker", 2)[:2] == [{"type": "image"}, {"type": "image"}]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        common.user_content("<image><image>", 1)


@pytest.mark.parametrize("n_images", [1, 2])
def test_processor_inputs_for_one_and_two_images(toy_model, n_images):
    _, processor = toy_model
    image_id = processor.image_token_id
    rows = [
        {"problem": "<image>" * n_images + "Compare.", "images": [grid_image()] * n_images},
        {"problem": "Short <image>" + "<image>" * (n_images - 1), "images": [grid_image()] * n_images},
    ]
    texts = common.prompt_texts(processor, rows)
    images = [common.row_images(r, 3136, 50176) for r in rows]
    inputs = common.processor_inputs(processor, texts, images)
    assert inputs["image_grid_thw"].shape == (2 * n_images, 3)
    assert inputs["pixel_values"].shape[0] == 64 * 2 * n_images
    assert ((inputs["input_ids"] == image_id).sum(1) == 16 * n_images).all()
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding for generation


def test_resize_image_keeps_pixels_in_range():
    for w, h in [(30, 20), (112, 112), (4000, 3000), (50, 2000)]:
        out = common.resize_image(Image.new("RGB", (w, h)), 3136, 200_000)
        ow, oh = out.size
        assert ow % 28 == 0 and oh % 28 == 0
        assert 3136 <= ow * oh <= 200_000, (w, h, out.size)


def write_rows(path, rows):
    import datasets

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


def image_file(tmp_path, name="img.png"):
    path = tmp_path / name
    grid_image().save(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_load_rows_files_folders_and_splits(tmp_path, suffix):
    img = image_file(tmp_path)
    rows = [{"id": str(i), "problem": f"<image>Q{i}", "answer": str(i), "images": [img]} for i in range(3)]
    folder = tmp_path / "set"
    folder.mkdir()
    write_rows(folder / f"train{suffix}", rows)
    write_rows(folder / f"val{suffix}", rows[:1])
    assert [r["answer"] for r in common.load_rows(str(folder / f"train{suffix}"), "rl")] == ["0", "1", "2"]
    assert len(common.load_rows(str(folder), "rl", split="train")) == 3
    assert len(common.load_rows(f"{folder}@val", "rl")) == 1
    with pytest.raises(FileNotFoundError, match="no test"):
        common.load_rows(f"{folder}@test", "rl")


def test_toy_parquet_loads(toy_dir):
    assert len(common.load_rows(f"{toy_dir / 'data' / 'rl'}@val", "rl")) == 24
    assert len(common.load_rows(f"{toy_dir / 'data' / 'sft'}@train", "sft")) == 96


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"problem": "<image>Q", "images": ["IMG"]}, "missing 'answer'"),
        ({"problem": "<image>Q", "answer": "1", "images": [{"bytes": b"not a png"}]}, "image 0 is unreadable"),
        ({"problem": "<image><image>Q", "answer": "1", "images": ["IMG"]}, "2 <image> markers but 1 images"),
    ],
)
def test_bad_rows_are_named_or_skipped(tmp_path, bad, message):
    img = image_file(tmp_path)
    good = {"id": "g", "problem": "<image>Q", "answer": "1", "images": [img]}
    bad = {"id": "b", **{k: ([img if x == "IMG" else x for x in v] if k == "images" else v) for k, v in bad.items()}}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad, default=lambda b: b.decode()) + "\n")
    if "bytes" in str(bad["images"][0]):  # jsonl cannot hold bytes: use parquet for that case
        path = tmp_path / "rows.parquet"
        write_rows(path, [dict(good, images=[{"bytes": open(img, "rb").read()}]), bad])
    with pytest.raises(common.BadRowError, match=rf"rows\.(jsonl line 2|parquet row 1) \(id=b\): {message}"):
        common.load_rows(str(path), "rl")
    assert [r["id"] for r in common.load_rows(str(path), "rl", skip_bad_rows=True)] == ["g"]


def test_sft_label_mask_covers_exactly_the_assistant_turns(toy_model):
    _, processor = toy_model
    tok = processor.tokenizer
    row = {
        "messages": [
            {"role": "user", "content": "<image>How many red squares are there?"},
            {"role": "assistant", "content": "<think>I see 1.</think><answer>\\boxed{1}</answer>"},
            {"role": "user", "content": "And blue?"},
            {"role": "assistant", "content": "<answer>\\boxed{2}</answer>"},
        ],
        "images": [grid_image()],
    }
    short = {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Yo"}],
             "images": [grid_image()]}  # fmt: skip
    batch = common.sft_batch(processor, [row, short], 3136, 50176)
    for b, r in enumerate([row, short]):
        labels = batch["labels"][b]
        kept = labels[labels != common.IGNORE_INDEX].tolist()
        expected = []
        for m in r["messages"]:
            if m["role"] == "assistant":
                expected += tok.encode(m["content"], add_special_tokens=False) + [
                    tok.convert_tokens_to_ids("<|im_end|>")
                ]
        assert kept == expected
        # the kept tokens are contiguous runs that each end on <|im_end|>
        idx = (labels != common.IGNORE_INDEX).nonzero().flatten().tolist()
        assert batch["input_ids"][b, idx].tolist() == expected
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == common.IGNORE_INDEX).all()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("with_images", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_logprobs_match_naive(toy_model, padding_side, with_images, temperature):
    """The log-prob of each token is log softmax(logits / T) at that token: the distribution the
    rollouts sampled from (T = 0.6 in the recipe), and so is the entropy."""
    model, processor = toy_model
    torch.manual_seed(0)
    rows = [{"problem": ("<image>" if with_images else "") + q, "images": [grid_image()] if with_images else []}
            for q in ["How many red squares are there?", "Hi"]]  # fmt: skip
    processor.tokenizer.padding_side = padding_side
    try:
        inputs = common.processor_inputs(processor, common.prompt_texts(processor, rows), [r["images"] for r in rows])
    finally:
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float() / temperature
        naive = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        naive_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        for chunk in (3, 7, 1024):
            logp, ent = common.token_logprobs(model, inputs, chunk_size=chunk, entropy=True, temperature=temperature)
            mask = inputs["attention_mask"][:, 1:].bool()
            assert torch.allclose(logp[mask], naive[mask], atol=1e-5)
            assert torch.allclose(ent[mask], naive_entropy[mask], atol=1e-4)


def test_chunked_logprobs_gradient_matches_naive(toy_model):
    model, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [grid_image()]}]
    inputs = common.processor_inputs(processor, common.prompt_texts(processor, rows), [r["images"] for r in rows])
    grads = []
    for naive in (True, False):
        model.zero_grad()
        if naive:
            logits = model(**inputs).logits[:, :-1]
            logp = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        else:
            logp, _ = common.token_logprobs(model, inputs, chunk_size=5)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_load_image_sources(tmp_path):
    img = grid_image()
    path = image_file(tmp_path)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    for source in (img, path, buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, {"path": path}):
        assert common.load_image(source).size == (112, 112)


def test_atomic_checkpoint_round_trip(tmp_path, toy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = common.Dist(0, 1, 0, torch.device("cpu"))
    model = common.load_model(str(toy_dir / "model"), d.device)
    processor = common.load_processor(str(toy_dir / "model"))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out = tmp_path / "ckpt"
    common.save_checkpoint(model, processor, out, d, {"step": 7})
    common.save_checkpoint(model, processor, out, d, {"step": 8})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.load(out / "trainer_state.pt")["step"] == 8
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_recipe_prompts_are_placed_as_the_recipe_does(toy_model):
    """RL: Table 7 instruction + one space + problem in the user turn, the template's default system
    message kept; evaluation: Table 8 prompt as the system message, the problem alone in the user turn."""
    _, processor = toy_model
    row = {"problem": "<image>How many red squares are there?", "images": [grid_image()]}
    rl = common.PromptFormat(instruction=common.INSTRUCTIONS["recipe"])
    user = common.prompt_messages(row, rl)[-1]["content"]
    assert user[0] == {"type": "text", "text": common.RL_INSTRUCTION + " "} and user[1] == {"type": "image"}
    assert common.RL_INSTRUCTION.startswith("A conversation between User and Assistant.")
    assert "the key result enclosed in \\boxed{} </answer>." in common.RL_INSTRUCTION  # one backslash
    (text,) = common.prompt_texts(processor, [row], rl)
    default_system = common.prompt_texts(processor, [row])[0].split("<|im_start|>user")[0]
    assert text.startswith(default_system) and "You are a helpful assistant." in default_system
    assert text.index(common.RL_INSTRUCTION) < text.index("<|vision_start|>") < text.index("How many red")
    (evaluation,) = common.prompt_texts(processor, [row], common.PromptFormat(system=common.EVAL_SYSTEM_PROMPT))
    assert evaluation.startswith("<|im_start|>system\n" + common.EVAL_SYSTEM_PROMPT + "<|im_end|>")
    assert "You are a helpful assistant." not in evaluation
    assert evaluation.split("<|im_start|>user\n")[1].startswith("<|vision_start|><|image_pad|><|vision_end|>How many")


def test_derive_seed_streams_never_collide():
    """Distinct (seed, stream, counters) give distinct seeds, including the seed-0 collisions the
    old `seed * K + step` arithmetic had (validation after step k vs rollouts of step k + 1)."""
    streams = ["rollout", "val", "vas", "rank", "call", "eval", "sft-order"]
    seen = {}
    for seed in (0, 1, 2):
        for stream in streams:
            for k in range(200):
                value = common.derive_seed(seed, stream, k)
                assert 0 <= value < 2**31 and value == common.derive_seed(seed, stream, k)
                seen.setdefault(value, (seed, stream, k))
    assert len(seen) == 3 * len(streams) * 200  # no two inputs share a seed
    assert common.derive_seed(0, "val", 5) != common.derive_seed(0, "rollout", 6)


def test_rl_batch_runs_the_processor_once_per_prompt(toy_model, monkeypatch):
    """The n responses of a prompt share one processor call, and the batch equals the one built by
    processing every response's prompt separately (pixel values, grids, ids, masks)."""
    _, processor = toy_model
    prompts = [{"problem": "<image>How many red squares are there?", "images": [grid_image()]},
               {"problem": "text only"},
               {"problem": "<image>and <image>", "images": [grid_image(), grid_image().rotate(90)]}]  # fmt: skip
    order = [0, 0, 1, 2, 2, 0]
    responses = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]
    calls = []
    real = common.processor_inputs
    monkeypatch.setattr(common, "processor_inputs", lambda p, t, i: calls.append(len(t)) or real(p, t, i))
    shared, mask = common.rl_batch(processor, [prompts[i] for i in order], responses, 3136, 50176)
    assert calls == [3]  # one call, three distinct prompts
    separate, mask2 = common.rl_batch(processor, [dict(prompts[i]) for i in order], responses, 3136, 50176)
    assert calls == [3, 6]  # copies are distinct objects: processed one by one
    assert set(shared) == set(separate) and torch.equal(mask, mask2)
    for key in shared:
        assert torch.equal(shared[key], separate[key]), key
    assert shared["image_grid_thw"].shape[0] == 1 + 1 + 2 + 2 + 1  # images of rows 0, 0, 2, 2, 0
