"""mmr1.chat and mmr1.batches: rows -> chat messages -> model inputs, label masks, the recipe prompts."""

import pytest
import torch

from conftest import prompt_texts
from data import toy
from mmr1 import batches, chat, families, images


def grid_image(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


def test_user_content_markers():
    assert chat.user_content("<image>Q?", 1) == [{"type": "image"}, {"type": "text", "text": "Q?"}]
    assert chat.user_content("A <image> B <image>", 2) == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " B "}, {"type": "image"}
    ]  # fmt: skip
    assert chat.user_content("no marker", 2)[:2] == [{"type": "image"}, {"type": "image"}]
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        chat.user_content("<image><image>", 1)


@pytest.mark.parametrize("n_images", [1, 2])
def test_processor_inputs_for_one_and_two_images(toy_model, n_images):
    _, processor = toy_model
    image_id = processor.image_token_id
    rows = [
        {"problem": "<image>" * n_images + "Compare.", "images": [grid_image()] * n_images},
        {"problem": "Short <image>" + "<image>" * (n_images - 1), "images": [grid_image()] * n_images},
    ]
    texts = prompt_texts(processor, rows)
    pictures = [images.row_images(r, 3136, 50176, families.image_factor(processor)) for r in rows]
    inputs = batches.processor_inputs(processor, texts, pictures)
    assert inputs["image_grid_thw"].shape == (2 * n_images, 3)
    assert inputs["pixel_values"].shape[0] == 64 * 2 * n_images
    assert ((inputs["input_ids"] == image_id).sum(1) == 16 * n_images).all()
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding for generation


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
    batch = batches.sft_batch(processor, [row, short], 3136, 50176)
    for b, r in enumerate([row, short]):
        labels = batch["labels"][b]
        kept = labels[labels != batches.IGNORE_INDEX].tolist()
        expected = []
        for m in r["messages"]:
            if m["role"] == "assistant":
                expected += tok.encode(m["content"], add_special_tokens=False) + [
                    tok.convert_tokens_to_ids("<|im_end|>")
                ]
        assert kept == expected
        # the kept tokens are contiguous runs that each end on <|im_end|>
        idx = (labels != batches.IGNORE_INDEX).nonzero().flatten().tolist()
        assert batch["input_ids"][b, idx].tolist() == expected
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == batches.IGNORE_INDEX).all()


def test_recipe_prompts_are_placed_as_the_recipe_does(toy_model):
    """RL: Table 7 instruction + one space + problem in the user turn, the template's default system
    message kept; evaluation: Table 8 prompt as the system message, the problem alone in the user turn."""
    _, processor = toy_model
    row = {"problem": "<image>How many red squares are there?", "images": [grid_image()]}
    rl = chat.PromptFormat(instruction=chat.INSTRUCTIONS["recipe"])
    user = chat.prompt_messages(row, rl)[-1]["content"]
    assert user[0] == {"type": "text", "text": chat.RL_INSTRUCTION + " "} and user[1] == {"type": "image"}
    assert chat.RL_INSTRUCTION.startswith("A conversation between User and Assistant.")
    assert "the key result enclosed in \\boxed{} </answer>." in chat.RL_INSTRUCTION  # one backslash
    (text,) = prompt_texts(processor, [row], rl)
    default_system = prompt_texts(processor, [row])[0].split("<|im_start|>user")[0]
    assert text.startswith(default_system) and "You are a helpful assistant." in default_system
    assert text.index(chat.RL_INSTRUCTION) < text.index("<|vision_start|>") < text.index("How many red")
    (evaluation,) = prompt_texts(processor, [row], chat.PromptFormat(system=chat.EVAL_SYSTEM_PROMPT))
    assert evaluation.startswith("<|im_start|>system\n" + chat.EVAL_SYSTEM_PROMPT + "<|im_end|>")
    assert "You are a helpful assistant." not in evaluation
    assert evaluation.split("<|im_start|>user\n")[1].startswith("<|vision_start|><|image_pad|><|vision_end|>How many")


def test_rl_batch_takes_the_built_prompts_and_builds_nothing(toy_model, monkeypatch):
    """rl_batch lays out the Prompts it is given (a group's n responses share one Prompt value) and
    builds none itself; the batch equals the one from every response's prompt built separately
    (pixel values, grids, ids, masks)."""
    _, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [grid_image()]},
            {"problem": "text only"},
            {"problem": "<image>and <image>", "images": [grid_image(), grid_image().rotate(90)]}]  # fmt: skip
    order = [0, 0, 1, 2, 2, 0]
    responses = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15], [16, 17]]
    built = batches.build_prompts(processor, rows, chat.PromptFormat(), 3136, 50176)
    calls = []
    real = batches.build_prompt
    monkeypatch.setattr(batches, "build_prompt", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared, mask = batches.rl_batch(processor, [built[i] for i in order], responses)
    assert calls == []  # nothing rebuilt
    one_by_one = batches.build_prompts(processor, [dict(rows[i]) for i in order], chat.PromptFormat(), 3136, 50176)
    separate, mask2 = batches.rl_batch(processor, one_by_one, responses)
    assert set(shared) == set(separate) and torch.equal(mask, mask2)
    for key in shared:
        assert torch.equal(shared[key], separate[key]), key
    assert shared["image_grid_thw"].shape[0] == 1 + 1 + 2 + 2 + 1  # images of rows 0, 0, 2, 2, 0
