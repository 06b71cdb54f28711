"""Chat messages -> model inputs: processor calls, the SFT labels (assistant tokens only), the RL
prompt + response sequences with their response mask, and micro-batches planned by token budget."""

from __future__ import annotations

import torch

from .chat import PromptFormat, prompt_messages, sft_messages
from .config import BadRowError
from .dist import Dist, all_reduce_max
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
    """Groups this rank's sequences (token counts `lengths`) into micro-batches; returns lists of
    indices, each in increasing order.

    max_tokens > 0: at most max_tokens tokens per micro-batch (a longer sequence goes alone) and at
    most max_seqs sequences (0 = no cap); max_tokens = 0: max_seqs sequences per micro-batch in
    order (the fixed-count recipe). Every rank returns the SAME number of micro-batches, because
    under FSDP2 each forward/backward is a collective: the count is the largest any rank needs
    (first-fit decreasing on each rank, then an all-reduce max), and each rank spreads its
    sequences over that many, longest first into the lightest (balanced loads; when that would
    break the budget, the first-fit micro-batches are split instead). Every rank must hold at
    least that many sequences (grpo and sft give every rank the same number).
    """
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


def prompt_texts(processor, rows: list[dict], fmt: PromptFormat = PromptFormat()) -> list[str]:
    """Chat-templated prompt strings (ending in the assistant header) for RL/eval rows."""
    return [
        processor.apply_chat_template(prompt_messages(r, fmt), tokenize=False, add_generation_prompt=True) for r in rows
    ]


def prompt_lengths(
    processor, rows: list[dict], min_pixels: int, max_pixels: int, fmt: PromptFormat = PromptFormat()
) -> list[int]:
    """Tokens of each row's chat-templated prompt as the processor makes it, images expanded, but
    from the image headers alone: each image's one <|image_pad|> becomes (H/28) * (W/28) tokens of
    its resized size (2x2 merged 14-pixel patches). The same count for every engine."""
    out = []
    for text, row in zip(prompt_texts(processor, rows, fmt), rows):
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        for image in row.get("images") or []:
            w_bar, h_bar = resized_size(*image_size(image), min_pixels, max_pixels)  # a turn keeps the product
            n += (w_bar // 28) * (h_bar // 28) - 1
        out.append(n)
    return out


def processor_inputs(processor, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
    """Batched model inputs (left-padded) for chat strings and their per-row image lists."""
    flat = [im for ims in images for im in ims]
    inputs = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    return dict(inputs)


def assistant_mask(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """(B, T) bool: True on the tokens of each assistant turn, its closing <|im_end|> included.

    `header` is the token ids of "<|im_start|>assistant\\n"; the span runs from just after it to
    the next `end_id`.
    """
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
    """Model inputs + `labels` for SFT rows; labels are IGNORE_INDEX outside assistant turns.

    Right-padded (B, T) tensors; sequences longer than max_length (if > 0) are cut on the right.
    """
    texts = [processor.apply_chat_template(sft_messages(r), tokenize=False) for r in rows]
    images = [row_images(r, min_pixels, max_pixels) for r in rows]
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
    return _cut(inputs, max_length)


def _cut(inputs: dict[str, torch.Tensor], max_length: int) -> dict[str, torch.Tensor]:
    """The (B, T) token tensors cut to max_length on the right (0 = no cut)."""
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


def sft_cut_problem(inputs: dict[str, torch.Tensor], max_length: int, image_token_id: int) -> str | None:
    """Why cutting one row's uncut sft_batch inputs at max_length would spoil it, or None.

    Two cuts are bad: one that drops image tokens (the processor's image features would no longer
    match the image tokens left: transformers refuses the batch), and one that leaves no assistant
    token to learn from (the row would train on nothing: loss 0, silently).
    """
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    n = int(inputs["attention_mask"][0].sum())
    if not max_length or n <= max_length:
        return None
    image_positions = (ids[:n] == image_token_id).nonzero().flatten().tolist()
    if image_positions and image_positions[-1] >= max_length:
        return (
            f"--max-length {max_length} cuts inside its image tokens (positions {image_positions[0]}-"
            f"{image_positions[-1]} of {n}); raise --max-length or lower --max-pixels"
        )
    if not (labels[1:max_length] != IGNORE_INDEX).any():
        first = int((labels != IGNORE_INDEX).nonzero().flatten()[0]) if (labels != IGNORE_INDEX).any() else n
        return f"--max-length {max_length} cuts away its whole assistant turn (it starts at token {first} of {n})"
    return None


def _blank_row(inputs: dict[str, torch.Tensor], max_length: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """A skipped row's stand-in: its tokens before the cut and before its first image token, no
    images, no labels; it keeps the rank's sequence count (micro-batch plans are collective) and
    adds nothing to the loss."""
    ids = inputs["input_ids"][0]
    images_at = (ids == image_token_id).nonzero().flatten().tolist()
    keep = min(max_length, images_at[0] - 1 if images_at else max_length)  # before <|vision_start|>
    out = {k: v[:, :keep] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["labels"] = torch.full_like(out["input_ids"], IGNORE_INDEX)
    return out


def sft_micro_batches(
    processor,
    rows: list[dict],
    min_pixels: int,
    max_pixels: int,
    max_length: int,
    max_tokens: int,
    max_seqs: int,
    d: Dist | None = None,
    names: list[str] | None = None,
    skipped: list[str] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's SFT rows as micro-batches (sft_batch inputs + labels) planned by token budget
    (plan_micro_batches; the same count on every rank). Each row is processed once, on its own.

    A row that max_length would spoil (sft_cut_problem) raises BadRowError naming it (`names[i]`),
    or, when a `skipped` list is given (--skip-bad-rows), is replaced by a blank stand-in that
    carries no loss and its message is appended to `skipped`."""
    single = []
    for i, r in enumerate(rows):
        inputs = sft_batch(processor, [r], min_pixels, max_pixels, 0)
        problem = sft_cut_problem(inputs, max_length, processor.image_token_id)
        if problem is not None:
            message = f"{names[i] if names else f'row {i}'}: {problem}"
            if skipped is None:
                raise BadRowError(message)
            skipped.append(message)
            single.append(_blank_row(inputs, max_length, processor.image_token_id))
        else:
            single.append(_cut(inputs, max_length))
    lengths = [int(s["attention_mask"].sum()) for s in single]
    pad_id = processor.tokenizer.pad_token_id
    return [collate([single[i] for i in idx], pad_id) for idx in plan_micro_batches(lengths, max_tokens, max_seqs, d)]


def encode_prompts(
    processor, rows: list[dict], min_pixels: int, max_pixels: int, fmt: PromptFormat = PromptFormat()
) -> dict[int, dict]:
    """Each distinct prompt (row object) through the processor once (chat template, image resize
    and patching): id(row) -> {"ids": prompt token ids, "pixel_values": (P, D) patches of its
    images or None, "image_grid_thw": (k, 3) or None}."""
    distinct = list({id(r): r for r in rows}.values())
    encoded = processor_inputs(
        processor, prompt_texts(processor, distinct, fmt), [row_images(r, min_pixels, max_pixels) for r in distinct]
    )
    # pixel_values holds all images' patches back to back, image_grid_thw one row per image
    grids = encoded.get("image_grid_thw", torch.zeros((0, 3), dtype=torch.long))
    patch_ends = [0] + grids.prod(-1).cumsum(0).tolist()
    image_ends = [0] + torch.tensor([len(r.get("images") or []) for r in distinct]).cumsum(0).tolist()
    out = {}
    for p, r in enumerate(distinct):
        first, last = image_ends[p], image_ends[p + 1]
        ids = encoded["input_ids"][p][encoded["attention_mask"][p].bool()].tolist()
        has = last > first
        out[id(r)] = {
            "ids": ids,
            "pixel_values": encoded["pixel_values"][patch_ends[first] : patch_ends[last]] if has else None,
            "image_grid_thw": grids[first:last] if has else None,
        }
    return out


def rl_batch(
    processor,
    rows: list[dict],
    responses: list[list[int]],
    min_pixels: int,
    max_pixels: int,
    fmt: PromptFormat = PromptFormat(),
    prompts: dict[int, dict] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs for prompt + sampled response sequences, and the response-token mask.

    rows[i] is the prompt of responses[i] (token ids); the n responses of one prompt share the row
    object, and each distinct prompt goes through the processor (chat template, image resize and
    patching) once (or not at all when `prompts`, from encode_prompts, already holds it). Returns
    right-padded (B, T) inputs with the rows' pixel_values / image_grid_thw / mm_token_type_ids,
    and a (B, T-1) float mask that is 1 where the TARGET token input_ids[:, 1:] is a response
    token (aligned with token_logprobs).
    """
    prompts = prompts if prompts is not None else encode_prompts(processor, rows, min_pixels, max_pixels, fmt)
    length = max(len(prompts[id(r)]["ids"]) + len(resp) for r, resp in zip(rows, responses))
    input_ids = torch.full((len(rows), length), processor.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length), dtype=torch.float32)
    pixel_parts, grid_parts = [], []
    for b, (r, resp) in enumerate(zip(rows, responses)):
        prompt = prompts[id(r)]
        n = len(prompt["ids"])
        input_ids[b, : n + len(resp)] = torch.tensor(prompt["ids"] + list(resp), dtype=torch.long)
        attention_mask[b, : n + len(resp)] = 1
        response_mask[b, n : n + len(resp)] = 1
        if prompt["pixel_values"] is not None:
            pixel_parts.append(prompt["pixel_values"])
            grid_parts.append(prompt["image_grid_thw"])
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    inputs["mm_token_type_ids"] = (input_ids == processor.image_token_id).long()  # 1 = image token
    if pixel_parts:
        inputs["pixel_values"], inputs["image_grid_thw"] = torch.cat(pixel_parts), torch.cat(grid_parts)
    return inputs, response_mask[:, 1:]


def rl_micro_batches(
    processor,
    rows: list[dict],
    responses: list[list[int]],
    min_pixels: int,
    max_pixels: int,
    fmt: PromptFormat,
    max_tokens: int,
    max_seqs: int,
    d: Dist | None = None,
) -> list[tuple[list[int], dict[str, torch.Tensor], torch.Tensor]]:
    """This rank's sequences (rows[i] + responses[i]) as micro-batches planned by token budget
    (plan_micro_batches; the same count on every rank): a list of (indices into rows, right-padded
    inputs, (B, T-1) response mask) as rl_batch builds them. Each prompt is processed once."""
    prompts = encode_prompts(processor, rows, min_pixels, max_pixels, fmt)
    lengths = [len(prompts[id(r)]["ids"]) + len(resp) for r, resp in zip(rows, responses)]
    out = []
    for idx in plan_micro_batches(lengths, max_tokens, max_seqs, d):
        inputs, mask = rl_batch(
            processor, [rows[i] for i in idx], [responses[i] for i in idx], min_pixels, max_pixels, fmt, prompts
        )
        out.append((idx, inputs, mask))
    return out
