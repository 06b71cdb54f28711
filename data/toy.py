"""The toy task and the toy model: the project's lab bench.

Every stage runs on this with no --model/--data flags, on CPU, in minutes.

Task. Each image is a 2x2 grid of solid 56-px squares, each red, green, blue or yellow. A tiny
vision tower learns to see such large solid regions in a few hundred steps; the difficulty spread
lives in what the question asks of what is seen:

    family   question (example)                                      answer       difficulty
    count    How many red squares are there?                         0..4         easy
    color    What colour is the top-left square?  (choices A-D)     letter       easy
    either   How many squares are red or blue?                       0..4         medium
    arith    Count the green squares, multiply by 3, then add 7.     0..19        hard

Counts are drawn uniformly before the grid is painted, and multiple-choice options are shuffled,
so the question text alone predicts the answer no better than chance (tests check this).

Model. A randomly initialised Qwen2_5_VLForConditionalGeneration of about a million parameters,
with a Qwen2_5_VLProcessor whose byte-level BPE tokenizer is trained on the toy corpus and carries
Qwen's special tokens and chat template. Saved with save_pretrained and loaded back through the
same from_pretrained / AutoProcessor calls as a real checkpoint. `--family qwen2_vl` / `qwen3_vl`
builds the same toy (tokenizer, text sizes) as a Qwen2-VL or Qwen3-VL model instead (docs/models.md).

    python -m data.toy                     # writes data/toy/{sft,rl}/*.parquet and runs/toy-init
    python -m data.toy --variant slip      # the RL bench: data/toy-slip/{sft,rl}/*.parquet (see below)
    python -m data.toy --family qwen3_vl   # ... and the Qwen3-VL toy in runs/toy-init-qwen3_vl

Variant `slip` (the bench where RL visibly learns; docs/rl-bench.md). The default toy's SFT model
errs by perceptual guesses, which a right sample on one image does little to fix on another. Here
perception is made easy and the error is one of policy: only the arith family, always counting
red squares, and in a set share (--slip-share, default 0.6) of the SFT traces of the
"multiply by 3" rows the trace counts right and then slips, adding 3 instead of multiplying, with
the boxed answer following the slip. The SFT model learns to count and learns the slip; the RL,
validation and test rows keep the right answers, so GRPO can remove the slip. The slip is drawn
from its own random stream: the rows themselves do not depend on the share.

Variant `spread` (the sampler-study bench; docs/vas-study.md). Arith on red as in `slip`, the
multiplier uniform over 1, 3, 4, 5, 6 and the addend in 1..9, with a different slip per multiplier
(SPREAD_SLIPS) at its own rate (SPREAD_SHARES), from never to almost always:

    x1   never slips                                             the easy rows
    x3   0.30  adds 3 instead of multiplying      k + 3 = m. m + a = r.
    x4   0.85  subtracts the addend               k x 4 = m. m - a = r.
    x5   0.93  forgets the add, boxes the product k x 5 = m.
    x6   0.97  adds 6 once more at the end        k x 6 = m. m + a = r. r + 6 = s.

Each slip sits at its own place in the trace and writes its own wrong token there (the first
operator, the second operator, the end after one step, the end after two), so unlearning one
habit on its own rows does little for the others, and the rarely-right x5 / x6 rows give GRPO a
signal only now and then: after SFT pass rates spread by operation from near 1 (x1) to near 0
(x6), most prompts have no outcome variance at N = 8, and uniform sampling learns slowly: the
regime VAS is built for (measured: uniform GRPO fixes x4 in about 10 steps and x5 / x6 only after
about 45; docs/toy.md). The shares are tuned to that: at 0.85 (x5 in a first design) a slip was
fixed in about 10 steps. Every slip changes the answer at every count 0..4 and addend 1..9
(k + 3 = 3k has no integer root; the others differ by 2a, a or 6; the addend starts at 1 so that
"forgets the add" and "subtracts" always change it); tests/test_toy_spread.py checks all of it.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
TOY_DATA_DIR = ROOT / "data" / "toy"
TOY_MODEL_DIR = ROOT / "runs" / "toy-init"

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20)}
POSITIONS = ["top-left", "top-right", "bottom-left", "bottom-right"]
CELL = 56  # px per grid cell: the image is 2*CELL square = 16 merged Qwen2.5-VL image tokens
FAMILIES = ("count", "color", "either", "arith")
SPLIT_SIZES = {"train": 4000, "val": 200, "test": 300}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}  # added to the user seed: splits never overlap in RNG
VARIANTS = ("default", "slip", "spread")
VARIANT_HELP = (  # the --toy flag of sft.py, grpo.py and eval.py
    "the toy used when neither --model nor --data is given: default (four question families), slip (arith "
    "with a slip in the SFT traces that GRPO removes: RL visibly helps, docs/rl-bench.md) or spread (slips at "
    "a different rate per multiplier: the sampler-study bench, docs/vas-study.md)"
)
VARIANT_DATA_DIRS = {
    "default": TOY_DATA_DIR,
    "slip": ROOT / "data" / "toy-slip",
    "spread": ROOT / "data" / "toy-spread",
}
GREEDY_VAL_VARIANTS = ("slip", "spread")  # their errors are greedy habits: validated greedily by default
SLIP_COLOR = "red"  # slip variant: the one colour every question counts
SLIP_MUL = 3  # slip variant: the multiplier whose SFT traces slip (input-dependent, so greedy decoding slips too)
SLIP_SHARE = 0.6  # slip variant: share of the SFT traces of SLIP_MUL rows that slip
# spread variant: multiplier -> share of its SFT traces that slip (each multiplier's slip: SPREAD_SLIPS)
SPREAD_SHARES = {1: 0.0, 3: 0.3, 4: 0.85, 5: 0.93, 6: 0.97}


@dataclass
class ToyExample:
    """The drawing parameters of one example; everything else is derived from them."""

    grid: list[str]  # 4 colour names, row-major (top-left, top-right, bottom-left, bottom-right)
    family: str
    target: str  # the colour the question is about (count / arith / either's first)
    other: str = ""  # either's second colour
    mul: int = 1  # arith: multiply
    add: int = 0  # arith: add
    position: int = 0  # color: which cell
    choices: tuple[str, ...] = ()  # color: shuffled colour names


def draw_grid(grid: list[str]) -> Image.Image:
    """(2*CELL, 2*CELL) RGB image of the 2x2 colour grid, thin black borders between cells."""
    image = Image.new("RGB", (2 * CELL, 2 * CELL), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(grid):
        x, y = (i % 2) * CELL, (i // 2) * CELL
        draw.rectangle([x + 2, y + 2, x + CELL - 3, y + CELL - 3], fill=COLORS[name])
    return image


def sample_example(rng: random.Random) -> ToyExample:
    """Draw one example: the family, the question's parameters, then a grid that fits them."""
    family = rng.choice(FAMILIES)
    names = list(COLORS)
    target = rng.choice(names)
    if family == "either":
        other = rng.choice([c for c in names if c != target])
        k = rng.randint(0, 4)  # uniform answer: the number of cells painted target or other
        grid = [rng.choice([target, other]) for _ in range(k)]
        grid += [rng.choice([c for c in names if c not in (target, other)]) for _ in range(4 - k)]
        rng.shuffle(grid)
        return ToyExample(grid, family, target, other=other)
    if family == "color":
        grid = [rng.choice(names) for _ in range(4)]
        choices = tuple(rng.sample(names, len(names)))
        return ToyExample(grid, family, target="", position=rng.randrange(4), choices=choices)
    k = rng.randint(0, 4)  # uniform count of the target colour
    grid = [target] * k + [rng.choice([c for c in names if c != target]) for _ in range(4 - k)]
    rng.shuffle(grid)
    if family == "arith":
        return ToyExample(grid, family, target, mul=rng.randint(1, 3), add=rng.randint(0, 9))
    return ToyExample(grid, family, target)


def sample_slip_example(rng: random.Random) -> ToyExample:
    """Variant `slip`: an arith example counting SLIP_COLOR (count uniform in 0..4, multiplier in
    1..3, addend in 0..9); the other cells take the other colours."""
    k = rng.randint(0, 4)
    grid = [SLIP_COLOR] * k + [rng.choice([c for c in COLORS if c != SLIP_COLOR]) for _ in range(4 - k)]
    rng.shuffle(grid)
    return ToyExample(grid, "arith", SLIP_COLOR, mul=rng.randint(1, 3), add=rng.randint(0, 9))


def sample_spread_example(rng: random.Random) -> ToyExample:
    """Variant `spread`: an arith example counting SLIP_COLOR (count uniform in 0..4), the multiplier
    uniform over SPREAD_SHARES' keys, the addend in 1..9 (never 0: see the module docstring)."""
    k = rng.randint(0, 4)
    grid = [SLIP_COLOR] * k + [rng.choice([c for c in COLORS if c != SLIP_COLOR]) for _ in range(4 - k)]
    rng.shuffle(grid)
    return ToyExample(grid, "arith", SLIP_COLOR, mul=rng.choice(sorted(SPREAD_SHARES)), add=rng.randint(1, 9))


def slip_probability(ex: ToyExample, variant: str, slip_share: float) -> float:
    """The chance that the SFT trace of `ex` slips: slip_share on SLIP_MUL rows (slip), the
    multiplier's SPREAD_SHARES entry (spread), 0 otherwise."""
    if variant == "slip":
        return slip_share if ex.mul == SLIP_MUL else 0.0
    if variant == "spread":
        return SPREAD_SHARES[ex.mul]
    return 0.0


def question(ex: ToyExample) -> str:
    """The question text (without the <image> marker)."""
    if ex.family == "count":
        return f"How many {ex.target} squares are there?"
    if ex.family == "either":
        return f"How many squares are {ex.target} or {ex.other}?"
    if ex.family == "arith":
        return f"Count the {ex.target} squares, multiply by {ex.mul}, then add {ex.add}. What is the result?"
    options = " ".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(ex.choices))
    return f"What colour is the {POSITIONS[ex.position]} square? Choices: {options}"


def solve(ex: ToyExample) -> tuple[str, str]:
    """(reasoning, answer) computed from the drawing parameters: the ground truth."""
    if ex.family == "color":
        seen = ex.grid[ex.position]
        letter = "ABCD"[ex.choices.index(seen)]
        return f"The {POSITIONS[ex.position]} square is {seen}, which is option {letter}.", letter
    k = sum(c == ex.target for c in ex.grid)
    if ex.family == "count":
        return f"I see {k} {ex.target} squares.", str(k)
    if ex.family == "either":
        j = sum(c == ex.other for c in ex.grid)
        return f"I see {k} {ex.target} and {j} {ex.other} squares. {k} + {j} = {k + j}.", str(k + j)
    m = k * ex.mul
    return f"I see {k} {ex.target} squares. {k} x {ex.mul} = {m}. {m} + {ex.add} = {m + ex.add}.", str(m + ex.add)


def slip(ex: ToyExample) -> tuple[str, str]:
    """(reasoning, answer) of an arith trace that counts right, then adds the multiplier instead of
    multiplying; the answer follows the slip. (For SLIP_MUL = 3 it differs from solve()'s at every
    count 0..4, since k + 3 = 3k has no integer solution.)"""
    k = sum(c == ex.target for c in ex.grid)
    m = k + ex.mul
    return f"I see {k} {ex.target} squares. {k} + {ex.mul} = {m}. {m} + {ex.add} = {m + ex.add}.", str(m + ex.add)


def slip_subtract(ex: ToyExample) -> tuple[str, str]:
    """Spread x4's slip: multiplies right, then subtracts the addend (answer mk - a, off by 2a)."""
    k = sum(c == ex.target for c in ex.grid)
    m = k * ex.mul
    return f"I see {k} {ex.target} squares. {k} x {ex.mul} = {m}. {m} - {ex.add} = {m - ex.add}.", str(m - ex.add)


def slip_forget_add(ex: ToyExample) -> tuple[str, str]:
    """Spread x5's slip: multiplies right, then stops and boxes the product (off by a)."""
    k = sum(c == ex.target for c in ex.grid)
    m = k * ex.mul
    return f"I see {k} {ex.target} squares. {k} x {ex.mul} = {m}.", str(m)


def slip_add_again(ex: ToyExample) -> tuple[str, str]:
    """Spread x6's slip: solves right, then adds the multiplier once more (off by the multiplier)."""
    reasoning, answer = solve(ex)
    s = int(answer) + ex.mul
    return f"{reasoning} {answer} + {ex.mul} = {s}.", str(s)


# spread variant: multiplier -> its slip, each at its own place in the trace (module docstring)
SPREAD_SLIPS = {3: slip, 4: slip_subtract, 5: slip_forget_add, 6: slip_add_again}


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of a PIL image (how images are stored in the parquet rows)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(
    n: int, seed: int, split: str, variant: str = "default", slip_share: float = SLIP_SHARE
) -> tuple[list[dict], list[dict]]:
    """n examples as (RL/eval rows, SFT rows); deterministic in (seed, split, variant, slip_share).

    Variants `slip` and `spread`: the SFT rows carry a `slip` column (True where the trace slips);
    the RL rows always hold the right answer. `slip_share` is the slip variant's (spread's shares are
    SPREAD_SHARES, its slips SPREAD_SLIPS)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown toy variant {variant!r}; choose from {VARIANTS}")
    rng = random.Random(seed * 1000 + SPLIT_SEEDS[split])
    slip_rng = random.Random(f"slip-{seed}-{split}")  # own stream: the rows do not depend on slip_share
    rl_rows, sft_rows = [], []
    for i in range(n):
        sample = {"slip": sample_slip_example, "spread": sample_spread_example}.get(variant, sample_example)
        ex = sample(rng)
        reasoning, answer = solve(ex)
        image = {"bytes": png_bytes(draw_grid(ex.grid)), "path": None}
        problem = "<image>" + question(ex)
        row = {"id": f"toy-{split}-{i}", "problem": problem, "answer": answer, "images": [image]}
        row["choices"] = list(ex.choices) if ex.family == "color" else None
        row["family"] = ex.family
        rl_rows.append(row)
        slipped = slip_rng.random() < slip_probability(ex, variant, slip_share)
        wrong = SPREAD_SLIPS[ex.mul] if variant == "spread" and slipped else slip  # x1 never slips
        shown, shown_answer = wrong(ex) if slipped else (reasoning, answer)
        solution = f"<think>{shown}</think><answer>\\boxed{{{shown_answer}}}</answer>"
        messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
        sft_rows.append({"id": row["id"], "messages": messages, "images": [image]})
        if variant != "default":
            sft_rows[-1]["slip"] = slipped
    return rl_rows, sft_rows


def write_toy_data(
    out_dir: Path | None = None,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    variant: str = "default",
    slip_share: float = SLIP_SHARE,
) -> Path:
    """Writes out_dir/rl/{train,val,test}.parquet and out_dir/sft/{train,val}.parquet.

    `sizes` overrides the rows per split (default SPLIT_SIZES: 4000 / 200 / 300); out_dir defaults
    to the variant's folder (VARIANT_DATA_DIRS).
    """
    import datasets

    out_dir = Path(out_dir or VARIANT_DATA_DIRS[variant])
    for split, n in (sizes or SPLIT_SIZES).items():
        rl_rows, sft_rows = make_rows(n, seed, split, variant, slip_share)
        (out_dir / "rl").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rl_rows).to_parquet(str(out_dir / "rl" / f"{split}.parquet"))
        if split != "test":
            (out_dir / "sft").mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(sft_rows).to_parquet(str(out_dir / "sft" / f"{split}.parquet"))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Toy model
# ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat template in spirit: string or typed-list content, one
# <|vision_start|><|image_pad|><|vision_end|> per image, default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pixels per image the toy processor accepts: exactly the 112x112 toy images (64 patches, 16 tokens)
# up to 4x that; the paper's real range is [7056, 1048576].
TOY_MIN_PIXELS = 56 * 56
TOY_MAX_PIXELS = 224 * 224


def corpus(n: int = 2000, seed: int = 123) -> list[str]:
    """Text the toy tokenizer is trained on: toy questions, solutions, chat scaffolding, digits."""
    rl_rows, sft_rows = make_rows(n, seed, "train")
    texts = [r["problem"] for r in rl_rows] + [r["messages"][1]["content"] for r in sft_rows]
    texts += ["system\nYou are a helpful assistant.\nuser\nassistant\n", "0 1 2 3 4 5 6 7 8 9 10 11 12 + x ="]
    texts += ["Solve the problem step by step. Put the final answer in \\boxed{}. (A) (B) (C) (D) (E)"]
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE Qwen2Tokenizer trained on the toy corpus, with Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",
    )


TOY_FAMILIES = (
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_5",
)  # the model types a toy is built for (mmr1/families.py)


def toy_model_dir(family: str = "qwen2_5_vl") -> Path:
    """Where `python -m data.toy --family F` writes the toy model: runs/toy-init for the default
    Qwen2.5-VL, runs/toy-init-<family> for the others."""
    return TOY_MODEL_DIR if family == "qwen2_5_vl" else ROOT / "runs" / f"toy-init-{family}"


def build_toy_model(out_dir: Path = TOY_MODEL_DIR, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """Builds, randomly initialises and saves a tiny model of `family` + its processor; returns out_dir.

    Text (every family): hidden 128, 4 layers, 4 heads (2 KV heads) of 32, vocab = the toy tokenizer's;
    Qwen3.5's layers 0-2 are Gated-DeltaNet linear attention (2 key heads, 4 value heads of 16), layer
    3 full attention, as its 3-to-1 pattern. Vision: hidden 64, 2 blocks, merge 2, output projected
    to 128; patch 14 (Qwen2-VL, Qwen2.5-VL) or 16 (Qwen3-VL, Qwen3.5), as in the released models.
    The toy's 112 x 112 images are 16 merged tokens in every family (a 32-px factor resizes them to
    128 x 128).
    """
    import torch

    if family not in TOY_FAMILIES:
        raise ValueError(f"no toy for model family {family!r}; choose from {TOY_FAMILIES}")
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    config_class, model_class, processor_class, vision_config, patch = TOY_BUILDERS[family]()
    if family in ("qwen3_vl", "qwen3_5"):  # their text config names the head size; the rotary sections interleave
        text_config.update(head_dim=32)
        text_config["rope_parameters"] = {**text_config["rope_parameters"], "mrope_interleaved": True}
    if family == "qwen3_5":  # rotary on a quarter of each head (8 of 32: sections of 4 pairs); linear attention
        text_config["rope_parameters"].update(mrope_section=[2, 1, 1], partial_rotary_factor=0.25)
        text_config.update(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_conv_kernel_dim=4)  # fmt: skip
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = pad
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": TOY_MIN_PIXELS, "longest_edge": TOY_MAX_PIXELS}
    geometry = {} if patch == 14 else {"patch_size": patch}  # the default family's processor: as always written
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(size=size, **geometry),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, **geometry),
        chat_template=CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, out_hidden_size=128, fullatt_block_indexes=[1])  # fmt: skip
    return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision, 14


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    # Qwen2-VL's vision config: embed_dim is the tower's width, hidden_size the merger's output (the text width)
    vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    return Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision, 14


def _qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    # 64 learned position embeddings (an 8 x 8 grid, interpolated to each image); block 0's features
    # also go into the text model (deepstack), as blocks 8, 16, 24 of the released 27 do
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])  # fmt: skip
    return Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, vision, 16


def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64)  # fmt: skip
    return Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, vision, 16


TOY_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl, "qwen3_5": _qwen3_5}


def ensure_toy(
    data_dir: Path | None = None, model_dir: Path = TOY_MODEL_DIR, seed: int = 0, variant: str = "default"
) -> None:
    """Builds the toy data (of `variant`, in its folder unless data_dir is given) and the toy initial
    model if they are not on disk yet."""
    data_dir = Path(data_dir or VARIANT_DATA_DIRS[variant])
    if not (data_dir / "rl" / "test.parquet").exists():
        print(f"[toy] writing toy data ({variant}) to {data_dir}")
        write_toy_data(data_dir, seed, variant=variant)
    if not (model_dir / "config.json").exists():
        print(f"[toy] building toy model in {model_dir}")
        build_toy_model(model_dir, seed)


def run_dir(stage: str, variant: str = "default") -> Path:
    """runs/<name> where the toy's `stage` (sft, grpo) writes by default: toy-sft, toy-grpo for the
    default toy, toy-slip-sft, toy-slip-grpo for the slip variant."""
    return ROOT / "runs" / (f"toy-{stage}" if variant == "default" else f"toy-{variant}-{stage}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Write the toy data set and the toy initial model."
    )
    parser.add_argument("--variant", choices=VARIANTS, default="default", help="which toy task (see the docstring)")
    parser.add_argument(
        "--slip-share", type=float, default=SLIP_SHARE, help="slip variant: share of x3 traces that slip"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the parquet splits go (default: per variant)"
    )
    parser.add_argument(
        "--family", choices=TOY_FAMILIES, default="qwen2_5_vl", help="model family of the toy model (docs/models.md)"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="where the toy model goes (default: runs/toy-init[-<family>])"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model init")
    args = parser.parse_args()
    data_dir = write_toy_data(args.data_dir, args.seed, variant=args.variant, slip_share=args.slip_share)
    model_dir = args.model_dir or toy_model_dir(args.family)
    build_toy_model(
        model_dir, args.seed, args.family
    )  # the same model for every variant (tokenizer: the default corpus)
    print(f"toy data ({args.variant}) in {data_dir}, toy model ({args.family}) in {model_dir}")
