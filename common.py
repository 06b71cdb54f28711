"""Plain-PyTorch code the stage scripts share.

distributed setup · model + processor loading · FSDP2 sharding · rows -> chat messages -> model
inputs · data loading · metric logging · atomic checkpoints · the config-dataclass CLI.
Nothing here runs at import time. Generation engines live in rollout.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100  # label of tokens that carry no loss

# The recipe's two prompts, verbatim (paper Tables 7 and 8; they are data, not prose to edit).
# RL: prepended to every problem inside the user turn, joined by one space (released training code).
RL_INSTRUCTION = (
    "A conversation between User and Assistant. The User provides an image and asks a question. The Assistant "
    "first analyzes both the image and the question, then carefully thinks about the reasoning process step by "
    "step, and finally provides the User with an accurate answer. The Assistant must carefully checkout the "
    "correctness and validity of each reasoning step. If any errors or inconsistencies are found during the "
    "reasoning process, the Assistant reflects and corrects them logically. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here, with potential reflections and corrections </think><answer> final answer here, with the key result "
    "enclosed in \\boxed{} </answer>."
)
# Evaluation: the system prompt of every benchmark question.
EVAL_SYSTEM_PROMPT = (
    "Please solve the problem step by step and put your answer in one \\boxed{}. "
    "If it is a multiple-choice question, only one letter should appear inside the \\boxed{}."
)

INSTRUCTIONS = {"recipe": RL_INSTRUCTION}  # names a --instruction flag may use instead of the text


@dataclass(frozen=True)
class PromptFormat:
    """How a row's problem becomes a chat prompt.

    instruction: text put before the problem in the user turn, joined by one space (RL_INSTRUCTION
    for the recipe's RL runs; empty for the toy). system: the system message (EVAL_SYSTEM_PROMPT
    for evaluation); empty keeps the chat template's default system message.
    """

    instruction: str = ""
    system: str = ""


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """A 31-bit seed for one random stream, distinct for every (seed, stream, counters).

    stream names the consumer ("rollout", "val", "vas", "sft-order", ...); counters are the step,
    the rank, a call number. Seeds of different streams never coincide by arithmetic accident
    (as `seed * K + step` schemes do at seed 0): the inputs go through numpy's SeedSequence hash.
    """
    words = [seed & 0xFFFFFFFF, *stream.encode(), *(c & 0xFFFFFFFF for c in counters)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------------------------
# Config dataclass -> argparse
# ---------------------------------------------------------------------------------------------


def parse_config(cls: type, presets: dict[str, dict[str, Any]] | None = None, argv: list[str] | None = None):
    """Builds an argparse CLI from a config dataclass and returns a filled instance.

    Every field becomes `--field-name`; its `help` metadata is the --help text. `--preset NAME`
    (when presets are given) sets defaults from presets[NAME]; flags given explicitly still win.
    """
    parser = argparse.ArgumentParser(description=cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).replace(" | None", ""), str)
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)
    args = parser.parse_args(argv)
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    preset = getattr(config, "preset", None)
    if presets and preset:
        if preset not in presets:
            parser.error(f"unknown --preset {preset!r}; choose from {sorted(presets)}")
        explicit = {a.split("=")[0] for a in (argv if argv is not None else __import__("sys").argv[1:])}
        unknown = set(presets[preset]) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"preset {preset!r} sets unknown fields {sorted(unknown)}")
        for name, value in presets[preset].items():
            if "--" + name.replace("_", "-") not in explicit:
                setattr(config, name, value)
    return config


def field(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field whose help text becomes the --help line of its flag."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


# ---------------------------------------------------------------------------------------------
# Distributed setup: RANK in the environment means torchrun
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Where this process stands: its rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (torchrun): collectives and FSDP2 are in play."""
        return self.world_size > 1


def setup_distributed(seed: int = 0) -> Dist:
    """Initialises torch.distributed when launched by torchrun (nccl on GPU, gloo on CPU).

    Without RANK in the environment it is a single process on cuda:0 or the CPU. Seeds python,
    numpy and torch with `seed` on every rank (per-rank streams are derived where needed).
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Dist(rank, world, local_rank, device)


def cleanup_distributed() -> None:
    """Tears down the process group if one was created."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a scalar or tensor over all ranks (identity on one process); returns a new tensor."""
    t = torch.as_tensor(value, dtype=torch.float64 if not torch.is_tensor(value) else value.dtype, device=device)
    t = t.clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_dict(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """{name: sum over ranks of values[name]}, one collective for the whole dict (same keys, same
    order on every rank); identity on one process."""
    names = list(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in names], dtype=torch.float64), device)
    return dict(zip(names, summed.tolist()))


def shard(items: list, d: Dist) -> tuple[list, int]:
    """This rank's contiguous share of `items`, padded to the same length on every rank.

    Returns (padded share, number of real items in it). Padding repeats items from the start, so
    every rank does equal work, which FSDP2 forwards and synced generation need; drop the padding
    (everything past the real count) before counting results.
    """
    per_rank = math.ceil(len(items) / d.world_size)
    mine = items[d.rank * per_rank : (d.rank + 1) * per_rank]
    padding = [items[i % len(items)] for i in range(per_rank - len(mine))] if items else []
    return list(mine) + padding, len(mine)


def all_gather_list(items: list, d: Dist) -> list:
    """Concatenation over ranks (rank order) of each rank's Python list."""
    if not d.enabled:
        return list(items)
    gathered: list[list] = [None] * d.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


# ---------------------------------------------------------------------------------------------
# Model + processor
# ---------------------------------------------------------------------------------------------


def attention_implementation(device: torch.device) -> str:
    """'flash_attention_2' on a GPU where flash-attn imports, else VARLEN_SDPA (PyTorch SDPA that
    runs each sequence of a packed row on its own; see sdpa_varlen)."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    register_sdpa_varlen()
    return VARLEN_SDPA


VARLEN_SDPA = "sdpa_varlen"  # the name models are loaded with where flash-attn is missing (CPU)


def sdpa_varlen(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers attention function: SDPA, but on a packed row (batch 1, no mask, text
    position_ids restarting at 0 per sequence) causal attention runs over each sequence on its
    own, as flash-attention's varlen kernel does on GPU.

    query (1, heads, N, D), key / value (1, kv_heads, N, D); returns ((1, N, heads, D), None).
    Exact: the same as SDPA under the block-diagonal causal mask transformers builds for packed
    rows, at sum(L_i^2) rather than N^2 cost (with that mask a packed toy micro-batch took up to
    2x the padded time on CPU). Everything else (padded batches, generation, the vision tower) goes
    to transformers' SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.get("position_ids")
    n = query.shape[2]
    if attention_mask is not None or positions is None or query.shape[0] != 1 or key.shape[2] != n:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    starts = (positions.reshape(-1) == 0).nonzero().flatten().tolist() + [n]  # (start of each sequence, N)
    if len(starts) <= 2:  # one sequence: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    parts = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
        for s, e in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(parts, dim=1), None


def register_sdpa_varlen() -> None:
    """Makes VARLEN_SDPA a transformers attention implementation (its masks are SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, sdpa_varlen)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def load_model(name_or_path: str, device: torch.device, gradient_checkpointing: bool = False, trainable: bool = False):
    """Qwen2.5-VL from a hub id or a local folder, never with remote code.

    Frozen models (reference, evaluation) are bf16 on GPU. Trainable ones keep fp32 master
    weights everywhere (an AdamW step of lr 1e-6 vanishes in bf16) and compute in bf16 on GPU
    through FSDP2's mixed precision (shard_model) or autocast. CPU: fp32 throughout.
    """
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if device.type == "cuda" and not trainable else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=attention_implementation(device),
        trust_remote_code=False,
    ).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor, left padding (generation), pixel range overridden when given."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        processor.image_processor.size = type(processor.image_processor.size)(**size)
    return processor


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: vision blocks, then text decoder layers."""
    inner = model.model if hasattr(model, "model") else model
    return list(inner.visual.blocks) + list(inner.language_model.layers)


def shard_model(model, d: Dist):
    """FSDP2 (`fully_shard`) per decoder layer and at the root; a no-op on one process."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if d.device.type == "cuda" and next(model.parameters()).dtype == torch.float32:  # fp32 master weights
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model.model.visual, **kwargs)  # patch embed + merger: a unit of its own, callable by itself
    fully_shard(model, reshard_after_forward=False, **kwargs)  # root: lm_head stays gathered for chunked log-probs
    # Sum the ranks' gradients instead of averaging them: each rank's loss is already its share of the
    # GLOBAL token mean (token sum / global token count), so the sum is the full-batch gradient.
    # (A plain SUM collective: gloo has no pre-multiplied sum, and a factor of 1 needs none.)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # FSDP2 initialises lazily on the first forward through the ROOT; generation can reach the
    # vision tower by itself first, so run one tiny text-only forward now.
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=d.device), use_cache=False, logits_to_keep=1)
    model.reshard()
    return model


def full_state_dict(model, d: Dist) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict; a collective under FSDP2, so every rank must call it."""
    if not d.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.reshard()  # the root keeps gathered tensors after a forward; state dicts want the shards

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# ---------------------------------------------------------------------------------------------
# Precision, device moves, the optimizer step: one definition each
# ---------------------------------------------------------------------------------------------


def autocast(device: torch.device) -> torch.autocast:
    """The one precision context of every forward: bf16 autocast on GPU (over fp32 master weights
    or bf16 frozen ones), plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The same dict with every tensor moved to `device`."""
    return {k: v.to(device) for k, v in batch.items()}


def clip_and_step(params, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clips the gradient to `max_norm` (global L2 norm over all ranks under FSDP2), takes the
    optimizer step, clears the gradients; returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ---------------------------------------------------------------------------------------------
# Per-token log-probs without the full-vocabulary log-softmax
# ---------------------------------------------------------------------------------------------


def hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) final (post-norm) hidden states of the decoder for the given model inputs.

    Runs the whole model (so FSDP2's root hooks and Qwen2.5-VL's own rope-index computation over
    pixel_values / image_grid_thw / mm_token_type_ids run as usual) but asks for one logit only;
    the hidden states are caught on their way out of the inner model.
    """
    caught = {}
    hook = model.model.register_forward_hook(lambda m, a, out: caught.__setitem__("h", out.last_hidden_state))
    try:
        model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught["h"]


def _chunk_logprobs(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, entropy: bool, temperature: float
):
    logits = torch.nn.functional.linear(hidden, weight).float() / temperature  # (B, C, V), C positions at a time
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, torch.zeros_like(logp)
    ent = lse - (logits.softmax(-1) * logits).sum(-1)  # H = logsumexp - E_p[logit]
    return logp, ent


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T) in fp32 of `targets` (B, T) under softmax(hidden (B, T, H) @ weight.T (V, H) / temperature).

    temperature: that of the sampler (GRPO's rollouts sample from softmax(logits / T), so the ratio,
    the KL and the entropy must be those of that distribution). lm_head + logsumexp run over chunks
    of `chunk_size` positions, each under activation checkpointing, so peak memory grows with
    chunk_size x V instead of T x V, forward and backward. Entropies (B, T), in nats, are zeros
    unless entropy=True (they carry no gradient).
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a positive temperature, got {temperature}")
    logps, ents = [], []
    for s in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size]
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(
                _chunk_logprobs, weight, h, t, entropy, temperature, use_reentrant=False
            )
        else:
            lp, ent = _chunk_logprobs(weight, h, t, entropy, temperature)
        logps.append(lp)
        ents.append(ent.detach())
    return torch.cat(logps, 1), torch.cat(ents, 1)


def token_logprobs(
    model,
    inputs: dict[str, torch.Tensor],
    chunk_size: int = 1024,
    entropy: bool = False,
    temperature: float = 1.0,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B, T-1) in fp32 of input_ids[:, 1:] given the prefix under softmax(logits /
    temperature), and entropies (B, T-1) of that distribution.

    The decoder runs once to hidden states; the vocabulary projection is chunked (see
    logprobs_from_hidden), so the full (T, V) log-softmax never exists. packed=True runs the same
    computation on the micro-batch's sequences packed into one row (packed_token_logprobs): equal
    values on every real target, zeros on padding, no compute spent on pad tokens.
    """
    if packed:
        return packed_token_logprobs(model, inputs, chunk_size, entropy, temperature)
    hidden = hidden_states(model, inputs)[:, :-1]
    targets = inputs["input_ids"][:, 1:]
    return logprobs_from_hidden(hidden, model.lm_head.weight, targets, chunk_size, entropy, temperature)


def batch_logprobs(
    model,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
    chunk_size: int = 1024,
    entropy: bool = False,
    temperature: float = 1.0,
    packed: bool = False,
):
    """token_logprobs of a CPU batch: moved to `device`, run under the precision context, packed
    (padding-free) or padded. Every training and scoring forward of the stages goes through here."""
    with autocast(device):
        return token_logprobs(model, to_device(inputs, device), chunk_size, entropy, temperature, packed)


# ---------------------------------------------------------------------------------------------
# Packed (padding-free) sequences
# ---------------------------------------------------------------------------------------------
# A right-padded micro-batch (B, T) spends compute on B*T - sum(L_b) pad tokens. Packing puts the
# B sequences back to back in ONE row of N = sum(L_b) tokens; two things keep each sequence blind
# to its neighbours, so every real token sees exactly what it saw in the padded batch:
#   positions restart per sequence: Qwen2.5-VL's 3-D rope positions are computed per sequence by
#     the model's own get_rope_index (on the padded batch), gathered over the real tokens;
#   attention stays inside each sequence: transformers reads sequence starts from a fourth,
#     1-D "text position" row put in front of the three rope rows (position_ids (4, 1, N), no
#     attention_mask). From its restarts it builds a block-diagonal causal mask for SDPA / eager
#     (masking_utils.find_packed_sequence_indices) and the cu_seqlens of flash-attention's varlen
#     kernel (modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids). That mask is
#     the readable reference; on CPU the models run VARLEN_SDPA, which reads the same restarts and
#     attends within each sequence, never forming the (N, N) mask (see sdpa_varlen).
# The vision tower is untouched: pixel_values / image_grid_thw pass through in the same order,
# and the image tokens keep their order in the packed row, so image embeddings land where they did.

PACKED_ATTENTION = (VARLEN_SDPA, "sdpa", "eager", "flash_attention_2", "flash_attention_3")  # those with a packed path


@dataclass
class Packed:
    """A padded micro-batch put into one row, and the way back.

    inputs: model inputs of the packed row: input_ids (1, N), position_ids (4, 1, N) (text
    positions, then Qwen2.5-VL's temporal / height / width rope positions), mm_token_type_ids
    (1, N), and pixel_values / image_grid_thw unchanged. valid: (B, T-1) bool, the positions of the
    padded layout whose target input_ids[:, t+1] is a real token of the same sequence. source: (M,)
    with M = valid.sum(), the packed position whose hidden state predicts each valid target, in
    the row-major order of valid; no source is a sequence's last token, so no target crosses into
    the next sequence.
    """

    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor
    source: torch.Tensor


def pack(model, inputs: dict[str, torch.Tensor]) -> Packed:
    """Packs padded model inputs (B, T) (input_ids, attention_mask, optional mm_token_type_ids,
    pixel_values, image_grid_thw; each row's real tokens contiguous: right or left padding) into
    one row of N = attention_mask.sum() tokens; see Packed."""
    implementation = model.config._attn_implementation
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"packed sequences need one of {PACKED_ATTENTION} attention, the model uses {implementation}")
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()  # (B, T)
    mm = inputs.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    # (3, B, T) rope positions of each sequence on its own, from the model's own function
    rope, _ = model.model.get_rope_index(ids, mm, image_grid_thw=inputs.get("image_grid_thw"), attention_mask=real)
    text = real.long().cumsum(1) - 1  # (B, T): 0, 1, ..., L_b - 1 over each row's real tokens
    positions = torch.cat([text[None].to(rope.device), rope])[:, real]  # (4, N), sequences back to back
    packed = {"input_ids": ids[real][None], "position_ids": positions[:, None], "mm_token_type_ids": mm[real][None]}
    packed.update({k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs})
    if implementation == VARLEN_SDPA:  # it finds the sequences itself: spare transformers the (N, N) mask
        packed["attention_mask"] = {"full_attention": None, "sliding_attention": None}  # a prepared mask per layer type
    valid = real[:, :-1] & real[:, 1:]  # (B, T-1): token t and its target t + 1 both real
    index = real.flatten().long().cumsum(0).view_as(ids) - 1  # (B, T): packed position of each real token
    return Packed(packed, valid, index[:, :-1][valid])


def unpack(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(B, T-1) padded layout of per-target values (M,) given in the order of packed.valid; zeros
    where there is no target (padding). Differentiable."""
    out = values.new_zeros(packed.valid.shape)
    return out.masked_scatter(packed.valid, values)


def packed_token_logprobs(
    model, inputs: dict[str, torch.Tensor], chunk_size: int = 1024, entropy: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_logprobs computed on the packed row: the same (B, T-1) log-probs and entropies (zero
    on padding), without running the decoder or lm_head on a single pad token."""
    packed = pack(model, inputs)
    hidden = hidden_states(model, packed.inputs)[0, packed.source]  # (M, H): positions that predict a real target
    targets = inputs["input_ids"][:, 1:][packed.valid]  # (M,) in the same order
    logp, ent = logprobs_from_hidden(
        hidden[None], model.lm_head.weight, targets[None], chunk_size, entropy, temperature
    )
    return unpack(logp[0], packed), unpack(ent[0], packed)


# ---------------------------------------------------------------------------------------------
# Micro-batches by token budget, the same count on every rank
# ---------------------------------------------------------------------------------------------


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest value of an integer over all ranks (the value itself on one process)."""
    t = torch.tensor(value, dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


# ---------------------------------------------------------------------------------------------
# Rows -> chat messages -> processor inputs
# ---------------------------------------------------------------------------------------------


class InputError(ValueError):
    """Bad input the user must fix (data, checkpoint, settings); its message names what and where.

    Stage scripts print it as one line and exit 1 (see exit_on_input_error), never as a traceback.
    """


class MissingDataError(InputError, FileNotFoundError):
    """A data file or split that is not there (also a FileNotFoundError)."""


class BadRowError(InputError):
    """A data row or data file that cannot be used; the message names the file, the row or line and the problem."""


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def exit_on_input_error(main) -> None:
    """Runs a stage script's main(), turning an InputError into a one-line message and exit status 1."""
    try:
        main()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


def load_image(image: Any):
    """PIL RGB image from a PIL image, a path, raw bytes or a `{"bytes": ..., "path": ...}` dict."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image).convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def resize_image(image, min_pixels: int, max_pixels: int, factor: int = 28):
    """Resizes so that H*W lies in [min_pixels, max_pixels] and H, W are multiples of `factor`.

    Keeps the aspect ratio (as Qwen2.5-VL's smart resize does), so HF and vLLM see the same pixels.
    """
    w, h = image.size
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels, factor)
    return image if (w_bar, h_bar) == (w, h) else image.resize((w_bar, h_bar))


def resized_size(w: int, h: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(width, height) in pixels that resize_image gives a w x h image: the size the processor sees."""
    h_bar, w_bar = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return w_bar, h_bar


MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize raises "absolute aspect ratio must be smaller than 200"


def check_image_shape(w: int, h: int, min_pixels: int, max_pixels: int) -> None:
    """Raises ValueError for a w x h image the Qwen2-VL image processor would refuse.

    The processor (transformers' smart_resize) gets the image after resize_image and refuses it
    when max(H, W) / min(H, W) > 200; an empty image would divide by zero there.
    """
    if min(w, h) < 1:
        raise ValueError(f"is {w}x{h} pixels (empty)")
    w_bar, h_bar = resized_size(w, h, min_pixels, max_pixels)
    if max(w_bar, h_bar) / min(w_bar, h_bar) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"is {w}x{h} pixels, resized to {w_bar}x{h_bar}: aspect ratio above the processor's limit of "
            f"{MAX_ASPECT_RATIO} (crop or pad it)"
        )


def user_content(text: str, n_images: int) -> list[dict]:
    """Typed chat content: text split at `<image>` markers, images placed there.

    With images and no marker at all, the images go before the text. Raises ValueError when the
    markers and images disagree in number.
    """
    n_markers = text.count(IMAGE_MARKER)
    if n_markers == 0:
        parts: list[dict] = [{"type": "image"} for _ in range(n_images)]
        return parts + ([{"type": "text", "text": text}] if text else [])
    if n_markers != n_images:
        raise ValueError(f"{n_markers} <image> markers but {n_images} images")
    parts = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def prompt_messages(row: dict, fmt: PromptFormat = PromptFormat()) -> list[dict]:
    """Chat messages of an RL/eval row: an optional system turn, then one user turn holding
    `fmt.instruction + " " + problem` with the row's images at its `<image>` markers."""
    text = f"{fmt.instruction} {row['problem']}" if fmt.instruction else row["problem"]
    system = [{"role": "system", "content": fmt.system}] if fmt.system else []
    return system + [{"role": "user", "content": user_content(text, len(row.get("images") or []))}]


def sft_messages(row: dict) -> list[dict]:
    """Chat messages of an SFT row with `<image>` markers of the user turns turned into parts.

    Images are handed out in order to the markers of successive user turns; a turn without
    markers takes no image, except that with no marker anywhere all images go to the first turn.
    """
    images = list(row.get("images") or [])
    any_marker = any(IMAGE_MARKER in m["content"] for m in row["messages"] if isinstance(m["content"], str))
    used, out = 0, []
    for i, m in enumerate(row["messages"]):
        content = m["content"]
        if m["role"] == "user" and isinstance(content, str):
            k = content.count(IMAGE_MARKER) if any_marker else (len(images) if i == first_user(row) else 0)
            content = user_content(content, k) if k or IMAGE_MARKER in content else content
            used += k
        out.append({"role": m["role"], "content": content})
    if used != len(images):
        raise ValueError(f"{used} <image> markers but {len(images)} images")
    return out


def first_user(row: dict) -> int:
    """Index of the first user turn in an SFT row's messages."""
    return next(i for i, m in enumerate(row["messages"]) if m["role"] == "user")


def row_images(row: dict, min_pixels: int, max_pixels: int) -> list:
    """The row's images as resized PIL images (see resize_image)."""
    return [resize_image(load_image(im), min_pixels, max_pixels) for im in (row.get("images") or [])]


def check_row(row: dict, kind: str, min_pixels: int = 3136, max_pixels: int = 1048576) -> dict:
    """Raises ValueError saying what is wrong with an 'rl' or 'sft' row; returns the row, normalised.

    RL rows: `problem` a non-empty str, `answer` given (numbers and lists become text through
    reward.answer_text), `choices` absent or a list (its items through answer_text). SFT rows:
    `messages` a list of {"role": str, "content": str} with an assistant turn. Both: `images` a
    list whose every image decodes and passes the processor's shape rules after resizing to
    [min_pixels, max_pixels] (check_image_shape), and as many `<image>` markers as images.
    """
    from reward import answer_text  # the gold-answer rule lives beside the equivalence rules

    images = row.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        raise ValueError(f"'images' is a {type(images).__name__}; give a list of images")
    row = dict(row)
    if kind == "rl":
        for key in ("problem", "answer"):
            if row.get(key) is None or (isinstance(row[key], str) and not row[key].strip()):
                raise ValueError(f"missing {key!r}")
        if not isinstance(row["problem"], str):
            raise ValueError(f"'problem' is a {type(row['problem']).__name__}, not a string")
        row["answer"] = answer_text(row["answer"])
        choices = row.get("choices")
        if choices is not None and not isinstance(choices, (list, tuple)):
            raise ValueError(f"'choices' is a {type(choices).__name__}; give a list of option texts")
        if choices:
            row["choices"] = [answer_text(c) for c in choices]
        prompt_messages(row)
    else:
        messages = row.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("'messages' is missing or not a list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {j} is not a {{'role', 'content'}} object")
            if not isinstance(m.get("content"), str):
                content = "null" if m.get("content") is None else f"a {type(m['content']).__name__}"
                raise ValueError(f"message {j} ({m['role']}) has content {content}, not a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn")
        sft_messages(row)
    for j, image in enumerate(images or []):
        try:
            loaded = load_image(image)
            loaded.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable image
            raise ValueError(f"image {j} is unreadable ({type(e).__name__}: {e})") from e
        try:
            check_image_shape(*loaded.size, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"image {j} {e}") from e
    return row


def prompt_texts(processor, rows: list[dict], fmt: PromptFormat = PromptFormat()) -> list[str]:
    """Chat-templated prompt strings (ending in the assistant header) for RL/eval rows."""
    return [
        processor.apply_chat_template(prompt_messages(r, fmt), tokenize=False, add_generation_prompt=True) for r in rows
    ]


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


def sft_micro_batches(
    processor,
    rows: list[dict],
    min_pixels: int,
    max_pixels: int,
    max_length: int,
    max_tokens: int,
    max_seqs: int,
    d: Dist | None = None,
) -> list[dict[str, torch.Tensor]]:
    """This rank's SFT rows as micro-batches (sft_batch inputs + labels) planned by token budget
    (plan_micro_batches; the same count on every rank). Each row is processed once, on its own."""
    single = [sft_batch(processor, [r], min_pixels, max_pixels, max_length) for r in rows]
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


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------


def load_rows(
    spec: str,
    kind: str,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int = 0,
    min_pixels: int = 3136,
    max_pixels: int = 1048576,
) -> list[dict]:
    """Rows of a data set, checked and normalised by check_row; `kind` is 'rl' or 'sft'.

    `spec`: a local .parquet/.jsonl/.json file, a local folder (its `<split>.*` file, or all data
    files in it), or a hub id; `name@split` picks the split. Relative image paths in a local file
    are relative to that file's folder. A bad row (or a jsonl line that is not a JSON object)
    raises BadRowError naming the file and the row (parquet, 0-based) or line (jsonl, 1-based), or
    is skipped and counted when skip_bad_rows is set; an empty or unreadable file is an error.
    `min_pixels` / `max_pixels`: the image range of the run, for the processor's shape rules.
    """
    name, _, at_split = spec.partition("@")
    split = at_split or split
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
        files = [p for p in candidates if p.stem == split] or ([] if at_split else candidates)
        if not files:
            raise MissingDataError(f"{path} has no {split}.parquet/.jsonl (found {[p.name for p in candidates]})")
    else:
        files = []
    rows, bad, seen = [], [], 0
    for where, row in _raw_rows(files, name, split):
        if limit and len(rows) >= limit:
            break
        seen += 1
        try:
            if isinstance(row, str):  # a line that is not a row: its problem
                raise ValueError(row)
            rows.append(check_row(row, kind, min_pixels, max_pixels))
        except (ValueError, TypeError, KeyError) as e:
            message = f"{where}" + (f" (id={row.get('id')})" if isinstance(row, dict) else "") + f": {e}"
            if not skip_bad_rows:
                raise BadRowError(message) from e
            bad.append(message)
    if bad:
        print(f"[data] skipped {len(bad)} bad rows of {seen} in {spec}; first: {bad[0]}")
    if not rows:
        raise BadRowError(f"{spec}: no usable rows")
    return rows


def _raw_rows(files: list[Path], name: str, split: str):
    """(where, row) for every row of local files (or of a hub data set when `files` is empty).

    `where` names the file and the parquet row (0-based) or jsonl line (1-based); `row` is a dict,
    or a string saying why that line is no row. Relative image paths are made absolute against
    the file's folder. Raises BadRowError for an unreadable or empty file.
    """
    import datasets

    if not files:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # noqa: BLE001 - not on the hub, no such split, offline: name it in one line
            raise BadRowError(
                f"{name}@{split}: not a local file or folder, and not loadable from the hub ({_first_line(e)})"
            ) from e
        for i, row in enumerate(ds):
            yield f"{name}@{split} row {i}", row
        return
    for file in files:
        count = 0
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                count = pq.ParquetFile(file).metadata.num_rows
                ds = datasets.load_dataset("parquet", data_files=[str(file)], split="train") if count else []
            except Exception as e:  # noqa: BLE001 - whatever pyarrow or datasets says, the file is unreadable
                raise BadRowError(f"{file}: not a readable parquet file ({_first_line(e)})") from e
            for i, row in enumerate(ds):
                yield f"{file} row {i}", _absolute_image_paths(row, file.resolve().parent)
        else:
            for where, row in _json_rows(file):
                count += 1
                yield where, _absolute_image_paths(row, file.resolve().parent) if isinstance(row, dict) else row
        if not count:
            raise BadRowError(f"{file}: empty (no rows)")


def _json_rows(file: Path):
    """(where, row or problem) per row of a JSON array file, or per non-blank line of a jsonl file."""
    data = file.read_bytes()
    if file.suffix == ".json" and data.lstrip().startswith(b"["):
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRowError(f"{file}: not valid JSON ({_first_line(e)})") from e
        for i, item in enumerate(items):
            yield f"{file} row {i}", item if isinstance(item, dict) else f"a JSON {type(item).__name__}, not an object"
        return
    import reward  # the one jsonl reader (reward.py's CLI reads predictions with it too)

    for _, where, row in reward.jsonl_objects(file):
        yield where, row


def _absolute_image_paths(row: dict, folder: Path) -> dict:
    """The row with relative image paths (str, or {"path"} without bytes) made relative to `folder`."""
    images = row.get("images")
    if not isinstance(images, (list, tuple)):
        return row
    out = []
    for image in images:
        if isinstance(image, str) and not os.path.isabs(image):
            image = str(folder / image)
        elif isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
            image = {**image, "path": image["path"] if os.path.isabs(image["path"]) else str(folder / image["path"])}
        out.append(image)
    return {**row, "images": out}


def _first_line(e: BaseException) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class MetricLogger:
    """One JSON line per step in <out>/metrics.jsonl; wandb / tensorboard mirrors when asked.

    A fresh run starts a new file; a run resumed from step N keeps the lines up to N and drops
    those a killed run wrote after its last checkpoint, so every step appears once.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: Any,
        enabled: bool,
        report_to: str = "",
        project: str = "mmr1",
        resume_from: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_from is not None and self.path.exists():
            kept = [x for x in self.path.read_text().splitlines() if x and json.loads(x)["step"] <= resume_from]
        self.path.write_text("".join(x + "\n" for x in kept))
        targets = {t for t in report_to.split(",") if t}
        if "wandb" in targets:
            self.wandb = _optional_import("wandb", "pip install wandb")
            self.wandb.init(project=project, config=dataclasses.asdict(config), dir=str(out_dir))
        if "tensorboard" in targets:
            tb = _optional_import("torch.utils.tensorboard", "pip install tensorboard")
            self.tb = tb.SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends {"step", "time", **metrics} (floats) to metrics.jsonl and mirrors it; rank 0 only."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flushes and closes the tensorboard / wandb mirrors."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _optional_import(module: str, how: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"{module} is not installed; {how}") from e


# ---------------------------------------------------------------------------------------------
# Checkpoints: HF-format model folder + trainer_state.pt, written atomically
# ---------------------------------------------------------------------------------------------


def save_checkpoint(model, processor, out_dir: str | Path, d: Dist, trainer_state: dict | None = None) -> None:
    """Writes out_dir as an HF model folder (+ processor, + trainer_state.pt) atomically.

    Every rank must call it (the full state dict is gathered collectively); rank 0 writes into
    a temporary folder and renames it over out_dir, so a kill mid-save leaves the old one intact.
    """
    state = full_state_dict(model, d)
    if d.master:
        out_dir = Path(out_dir)
        tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if d.enabled:
        dist.barrier()


def save_training_checkpoint(
    model, processor, optimizer, folder: str | Path, d: Dist, step: int, config: Any, **extra: Any
) -> None:
    """save_checkpoint with a trainer_state.pt holding the step, the full optimizer state, every
    rank's RNG states, the config and any script-specific `extra` (scheduler, sampler, VPS)."""
    state = {
        "step": step,
        "optimizer": optimizer_state(model, optimizer, d),
        "rng": all_gather_list([rng_state()], d),
        "config": dataclasses.asdict(config),
        **extra,
    }
    save_checkpoint(model, processor, folder, d, state)


def load_training_checkpoint(folder: str | Path, model, optimizer, d: Dist) -> dict:
    """Restores the optimizer and this rank's RNG states from folder/trainer_state.pt; returns the
    whole trainer state (its "step" and the script-specific entries)."""
    state = load_trainer_state(folder)
    load_optimizer_state(model, optimizer, state["optimizer"], d)
    set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
    return state


TRAINER_STATE_KEYS = ("step", "optimizer", "rng", "config")


def load_trainer_state(folder: str | Path, mmap: bool = False) -> dict:
    """folder/trainer_state.pt, unpickling plain types and tensors only (weights_only=True).

    CheckpointError naming the file when it is missing, damaged or lacks an entry; mmap=True maps
    the tensors instead of reading them (a cheap completeness check).
    """
    path = Path(folder) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - empty, truncated, or holding objects weights_only refuses
        raise CheckpointError(f"{path} is unreadable ({_first_line(e)})") from e
    missing = [k for k in TRAINER_STATE_KEYS if k not in state] if isinstance(state, dict) else TRAINER_STATE_KEYS
    if missing:
        raise CheckpointError(f"{path} lacks {list(missing)}")
    return state


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from (the damaged or missing file, named), or None if it is complete.

    Checks config.json, every safetensors weight file (header and size: a truncated file fails) and
    trainer_state.pt (loads with weights_only=True, memory-mapped, and holds every entry).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder / 'config.json'} is missing"
    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    except (ValueError, KeyError, AttributeError) as e:
        return f"{index} is unreadable ({_first_line(e)})"
    from safetensors import safe_open

    for name in names or ["model.safetensors"]:
        try:
            with safe_open(str(folder / name), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - missing, truncated or corrupt header
            return f"{folder / name} is unreadable ({_first_line(e)})"
    try:
        load_trainer_state(folder, mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


def latest_checkpoint(out_dir: str | Path, master: bool = True) -> Path | None:
    """The checkpoint to resume from: `final` if the run finished, else the `step-N` with the
    highest N; None if there is none.

    A damaged candidate (checkpoint_problem) is passed over for the previous complete one, and
    the master says so; CheckpointError names the damage when no candidate is complete.
    """
    out_dir = Path(out_dir)
    steps = [p for p in out_dir.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    steps.sort(key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    candidates = ([out_dir / "final"] if (out_dir / "final").is_dir() else []) + steps
    damaged = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged and master:
                print(f"[ckpt] passing over damaged checkpoint(s): {'; '.join(damaged)}; resuming from {folder}")
            return folder
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"no complete checkpoint in {out_dir} to resume from: {'; '.join(damaged)}")
    return None


def check_resume(
    folder: Path, cfg: Any, may_change: set[str], n_rows: int, total_steps: int, out_dir: Path, master: bool
) -> None:
    """Refuses a resume that could not continue the checkpoint's run exactly; records harmless changes.

    Compares the checkpoint's config with this run's: a change to a field outside `may_change`
    (data, batch shape, seeds, optimisation: what the trajectory depends on) is a CheckpointError
    listing every difference; changes inside `may_change` (run length, logging, validation, memory
    knobs) are printed by the master and appended to out_dir/config_changes.jsonl. Also refuses
    data that now gives another number of rows, and a run that would end before the checkpoint's step.
    """
    state = load_trainer_state(folder, mmap=True)
    saved, new = state["config"], dataclasses.asdict(cfg)
    changed = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}  # new fields: unchanged
    refused = [f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in may_change]
    if state.get("rows") is not None and state["rows"] != n_rows:
        refused.append(f"the data now gives {n_rows} rows, the checkpoint was trained on {state['rows']}")
    if total_steps < state["step"]:
        refused.append(f"this run would end at step {total_steps}, before the checkpoint's step {state['step']}")
    if refused:
        raise CheckpointError(
            f"--resume from {folder} would not continue that run exactly: {'; '.join(refused)}. Use the "
            f"checkpoint's settings ({out_dir / 'config.json'}) or a new --output-dir"
        )
    recorded = {k: list(ab) for k, ab in changed.items() if k not in ("resume", "stop_after")}  # launch-only flags
    if recorded and master:
        print(f"[ckpt] resuming {folder} at step {state['step']} with changed settings: {recorded}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps({"step": state["step"], "time": time.time(), "changes": recorded}) + "\n")


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tuples, dicts, lists, numbers and a tensor, so that
    trainer_state.pt loads with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": (624,) uint32, "pos"}, ...}
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restores what rng_state() captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def optimizer_state(model, optimizer, d: Dist) -> dict:
    """Full optimizer state dict (gathered from all ranks under FSDP2; a collective there)."""
    if not d.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model.reshard()

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, d: Dist) -> None:
    """Loads what optimizer_state() returned (re-sharded under FSDP2)."""
    if not d.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
