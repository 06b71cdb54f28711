"""Chat messages -> model inputs: processor calls, the SFT labels (assistant tokens only), the RL
prompt + response sequences with their response mask, and micro-batches planned by token budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .chat import PromptFormat, prompt_messages, sft_messages
from .dist import Dist, all_reduce_max
from .families import image_factor
from .images import image_size, resized_size, row_images

IGNORE_INDEX = -100  # label of tokens that carry no loss


def _longest_first(lengths: list[int], order: list[int], k: int, max_seqs: int) -> list[list[int]]:
    """LPT: each sequence, longest first, into the micro-batch with the fewest tokens (and room)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in order:
        open_bins = [j for j in range(k) if not max_seqs or len(bins[j]) < max_seqs]
        j = min(open_bins, key=lambda j: (loads[j], j))
        bins[j].append(i)
        loads[j] += lengths[i]
    return bins


def plan_micro_batches(lengths: list[int], max_tokens: int, max_seqs: int, d: Dist | None = None) -> list[list[int]]:
    """Groups this rank's sequences (token counts `lengths`) into micro-batches: lists of indices,
    each increasing. max_tokens > 0: at most max_tokens tokens (a longer sequence goes alone) and
    max_seqs sequences (0 = no cap) each; max_tokens = 0: max_seqs sequences each, in order. Every
    rank returns the SAME count (FSDP2's passes are collectives): the most any rank needs by first-fit
    decreasing, loads then balanced longest-first (docs/grpo.md, "Micro-batches by token budget")."""
    n = len(lengths)

    def tokens(b: list[int]) -> int:
        return sum(lengths[i] for i in b)

    longest_first = sorted(range(n), key=lambda i: -lengths[i])
    if max_tokens <= 0:  # fixed count, in order
        step = max_seqs or n or 1
        bins = [list(range(s, min(s + step, n))) for s in range(0, n, step)]
    else:  # first-fit decreasing: the fewest micro-batches this rank's sequences fit in
        bins = []
        for i in longest_first:
            room = [b for b in bins if tokens(b) + lengths[i] <= max_tokens and (not max_seqs or len(b) < max_seqs)]
            if room:
                room[0].append(i)
            else:
                bins.append([i])
    k = all_reduce_max(len(bins), d.device) if d is not None and d.enabled else len(bins)
    if k > n:
        raise ValueError(f"{n} sequences on this rank cannot fill the {k} micro-batches another rank needs")
    if max_tokens > 0:  # the same k micro-batches with balanced loads, if that keeps the budget
        balanced = _longest_first(lengths, longest_first, k, max_seqs)
        if all(len(b) == 1 or tokens(b) <= max_tokens for b in balanced):
            bins = balanced
    while len(bins) < k:  # split the micro-batch with the most tokens among those holding 2 or more
        part = bins.pop(max((j for j, b in enumerate(bins) if len(b) > 1), key=lambda j: tokens(bins[j])))
        bins += _longest_first(lengths, sorted(part, key=lambda i: -lengths[i]), 2, 0)
    bins = [sorted(b) for b in bins]
    # budgeted: heaviest first on every rank, so the i-th micro-batches of the ranks are alike in cost
    return sorted(bins, key=lambda b: -tokens(b)) if max_tokens > 0 else bins


# --- The prompt builder: one row -> what every engine, the batch builder and the door see ---


@dataclass
class Prompt:
    """One RL/eval row as the model sees it: messages, the chat-templated text (one <|image_pad|>
    per image), the images resized to the run's pixel range, and the prompt token ids with each
    image's pad expanded to its image tokens (image_tokens). pixel_values (P, 3*2*patch*patch) and
    image_grid_thw (k, 3) are the image processor's patches; the three image fields are empty for a
    prompt built with decode=False."""

    messages: list[dict]
    text: str
    images: list = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def build_prompt(
    processor, row: dict, fmt: PromptFormat, min_pixels: int, max_pixels: int, decode: bool = True
) -> Prompt:
    """The one prompt builder: a row -> Prompt. decode=True: images decoded, resized
    (images.resize_image) and patched; decode=False (the door's length check): only their headers are
    read, and `ids` is the list the decoded prompt would have (an image's tokens depend on its size)."""
    messages = prompt_messages(row, fmt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not row.get("images"):
        return Prompt(messages, text, [], ids)
    if decode:
        pictures = row_images(row, min_pixels, max_pixels, image_factor(processor))
        patched = processor.image_processor(images=pictures, return_tensors="pt")
        grids = patched["image_grid_thw"]
        counts = (grids.prod(-1) // processor.image_processor.merge_size**2).tolist()
        prompt = Prompt(messages, text, pictures, [], patched["pixel_values"], grids)
    else:
        counts = image_tokens(processor, row["images"], min_pixels, max_pixels)
        prompt = Prompt(messages, text)
    prompt.ids = expand_image_pads(ids, processor.image_token_id, counts)
    return prompt


def image_tokens(processor, images: list, min_pixels: int, max_pixels: int) -> list[int]:
    """Tokens of each image, from its header: (H/f) * (W/f) of its resized H x W pixels, f the
    processor's pixels per merged token along a side (families.image_factor: 28 for a 14-px patch)."""
    f = image_factor(processor)
    sizes = [resized_size(*image_size(im), min_pixels, max_pixels, f) for im in images]
    return [(w // f) * (h // f) for w, h in sizes]


def expand_image_pads(ids: list[int], pad_id: int, counts: list[int]) -> list[int]:
    """Token ids with the i-th `pad_id` repeated counts[i] times, as the processor expands a
    chat text's <|image_pad|> placeholders (the tokenizer splits text at special tokens, so
    expanding before or after tokenising gives the same ids)."""
    out, k = [], 0
    for t in ids:
        if t == pad_id:
            if k >= len(counts):
                raise ValueError(f"more <|image_pad|> tokens in the prompt than its {len(counts)} images")
            out += [pad_id] * counts[k]
            k += 1
        else:
            out.append(t)
    if k != len(counts):
        raise ValueError(f"{k} <|image_pad|> tokens in the prompt but {len(counts)} images")
    return out


def build_prompts(
    processor, rows: list[dict], fmt: PromptFormat, min_pixels: int, max_pixels: int, decode: bool = True
) -> list[Prompt]:
    """build_prompt of each row, in order."""
    return [build_prompt(processor, r, fmt, min_pixels, max_pixels, decode) for r in rows]


def processor_inputs(processor, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
    """Batched model inputs (left-padded) for chat strings and their per-row image lists."""
    flat = [im for ims in images for im in ims]
    inputs = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    return dict(inputs)


def assistant_mask(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """(B, T) bool: True on the tokens of each assistant turn, from just after `header` (the ids of
    "<|im_start|>assistant\\n") to the next `end_id` (<|im_end|>) included."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    h = len(header)
    for b, seq in enumerate(input_ids.tolist()):
        i = 0
        while i <= len(seq) - h:
            if seq[i : i + h] == header:
                j = i + h
                while j < len(seq) and seq[j] != end_id:
                    j += 1
                mask[b, i + h : min(j + 1, len(seq))] = True
                i = j
            i += 1
    return mask


def sft_batch(processor, rows: list[dict], min_pixels: int, max_pixels: int, max_length: int = 0) -> dict:
    """Model inputs + `labels` for SFT rows (IGNORE_INDEX outside assistant turns): right-padded (B, T)
    tensors, cut on the right at max_length (0 = no cut)."""
    texts = [processor.apply_chat_template(sft_messages(r), tokenize=False) for r in rows]
    images = [row_images(r, min_pixels, max_pixels, image_factor(processor)) for r in rows]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        inputs = processor_inputs(processor, texts, images)
    finally:
        tokenizer.padding_side = side
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    mask = assistant_mask(inputs["input_ids"], header, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    labels = inputs["input_ids"].masked_fill(~mask | (inputs["attention_mask"] == 0), IGNORE_INDEX)
    inputs["labels"] = labels
    if max_length and inputs["input_ids"].shape[1] > max_length:
        for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
            if key in inputs:
                inputs[key] = inputs[key][:, :max_length]
    return inputs


def collate(parts: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded (B, T) batch from right-padded batches (b_i, T_i) of model inputs (+ labels):
    rows stacked in order, T = max T_i, images (pixel_values, image_grid_thw) concatenated in order."""
    width = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        if any(key in p for p in parts):
            rows = [p.get(key, torch.full_like(p["input_ids"], value)) for p in parts]
            out[key] = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows])
    for key in ("pixel_values", "image_grid_thw"):
        if any(key in p for p in parts):
            out[key] = torch.cat([p[key] for p in parts if key in p])
    return out


def cut_problem(n: int, last_image: int | None, first_label: int | None, max_length: int) -> str | None:
    """Why cutting an n-token SFT sequence at max_length would spoil it, or None: a cut at or before
    last_image (its last image token: transformers refuses image features without their tokens), or
    at or before first_label (its first assistant token, None if none: the row would train on nothing)."""
    if not max_length or n <= max_length:
        return None
    if last_image is not None and last_image >= max_length:
        return f"--max-length {max_length} cuts inside its image tokens (last at position {last_image} of {n}); " + (
            "raise --max-length or lower --max-pixels"
        )
    if first_label is None or first_label >= max_length:
        start = n if first_label is None else first_label
        return f"--max-length {max_length} cuts away its whole assistant turn (it starts at token {start} of {n})"
    return None


def sft_layout(processor, row: dict, min_pixels: int, max_pixels: int) -> tuple[int, int | None, int | None]:
    """(tokens, position of the last image token or None, position of the first assistant token or
    None) of an SFT row as sft_batch would make it, from the chat text and the image headers alone
    (no image decoded): what the door needs to apply cut_problem over a whole split."""
    import numpy as np

    text = processor.apply_chat_template(sft_messages(row), tokenize=False)
    tokenizer = processor.tokenizer
    counts = image_tokens(processor, row.get("images") or [], min_pixels, max_pixels)
    ids = np.asarray(
        expand_image_pads(tokenizer(text, add_special_tokens=False)["input_ids"], processor.image_token_id, counts)
    )
    images_at = np.flatnonzero(ids == processor.image_token_id)
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    starts = np.flatnonzero(ids == header[0])
    first = next((int(i) + len(header) for i in starts if ids[i : i + len(header)].tolist() == header), None)
    first = first if first is not None and first < len(ids) else None
    return len(ids), int(images_at[-1]) if len(images_at) else None, first


def sft_micro_batches(processor, rows: list[dict], min_pixels: int, max_pixels: int, max_length: int, max_tokens: int,
                      max_seqs: int, d: Dist | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """This rank's SFT rows as micro-batches (sft_batch inputs + labels, cut at max_length) planned
    by token budget (plan_micro_batches; the same count on every rank). Each row is processed once,
    on its own. The rows are trusted: the door (prepare.py) left out any row the cut would spoil."""
    single = [sft_batch(processor, [r], min_pixels, max_pixels, max_length) for r in rows]
    lengths = [int(s["attention_mask"].sum()) for s in single]
    pad_id = processor.tokenizer.pad_token_id
    return [collate([single[i] for i in idx], pad_id) for idx in plan_micro_batches(lengths, max_tokens, max_seqs, d)]


def rl_batch(
    processor, prompts: list[Prompt], responses: list[list[int]]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs for prompt + sampled response sequences, and the response-token mask. prompts[i]
    is the decoded Prompt the engine sampled responses[i] (token ids) from. Returns right-padded (B, T)
    inputs with the prompts' pixel_values / image_grid_thw / mm_token_type_ids, and a (B, T-1) float
    mask, 1 where the TARGET token input_ids[:, 1:] is a response token (aligned with token_logprobs)."""
    pad = torch.nn.utils.rnn.pad_sequence
    pairs = list(zip(prompts, responses))
    ids = [torch.tensor(p.ids + list(resp), dtype=torch.long) for p, resp in pairs]
    input_ids = pad(ids, batch_first=True, padding_value=processor.tokenizer.pad_token_id)
    attention_mask = pad([torch.ones_like(x) for x in ids], batch_first=True)
    masks = [torch.tensor([0.0] * len(p.ids) + [1.0] * len(resp), dtype=torch.float32) for p, resp in pairs]
    response_mask = pad(masks, batch_first=True)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    inputs["mm_token_type_ids"] = (input_ids == processor.image_token_id).long()  # 1 = image token
    with_images = [p for p in prompts if p.pixel_values is not None]
    if with_images:
        inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
        inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
    return inputs, response_mask[:, 1:]


def rl_micro_batches(
    processor, prompts: list[Prompt], responses: list[list[int]], max_tokens: int, max_seqs: int, d: Dist | None = None
) -> list[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """This rank's sequences (prompts[i] + responses[i]) as micro-batches planned by token budget
    (plan_micro_batches; the same count on every rank): a list of (indices into the sequences,
    right-padded inputs, (B, T-1) response mask) as rl_batch builds them."""
    lengths = [len(p.ids) + len(resp) for p, resp in zip(prompts, responses)]
    out = []
    for idx in plan_micro_batches(lengths, max_tokens, max_seqs, d):
        inputs, mask = rl_batch(processor, [prompts[i] for i in idx], [responses[i] for i in idx])
        out.append((idx, inputs, mask))
    return out
