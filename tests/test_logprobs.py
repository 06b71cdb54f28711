"""mmr1.logprobs: the chunked log-probs equal the naive definition, values and gradients."""

import pytest
import torch

from conftest import prompt_texts
from data import toy
from mmr1 import batches, logprobs


def grid_image(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


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
        inputs = batches.processor_inputs(processor, prompt_texts(processor, rows), [r["images"] for r in rows])
    finally:
        processor.tokenizer.padding_side = "left"
    with torch.no_grad():
        naive, naive_entropy = logprobs.naive_token_logprobs(model, inputs, temperature)
        for chunk in (3, 7, 1024):
            logp, ent = logprobs.token_logprobs(model, inputs, chunk_size=chunk, entropy=True, temperature=temperature)
            mask = inputs["attention_mask"][:, 1:].bool()
            assert torch.allclose(logp[mask], naive[mask], atol=1e-5)
            assert torch.allclose(ent[mask], naive_entropy[mask], atol=1e-4)


def test_chunked_logprobs_gradient_matches_naive(toy_model):
    model, processor = toy_model
    rows = [{"problem": "<image>How many red squares are there?", "images": [grid_image()]}]
    inputs = batches.processor_inputs(processor, prompt_texts(processor, rows), [r["images"] for r in rows])
    grads = []
    for naive in (True, False):
        model.zero_grad()
        if naive:
            logp, _ = logprobs.naive_token_logprobs(model, inputs)
        else:
            logp, _ = logprobs.token_logprobs(model, inputs, chunk_size=5)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)
