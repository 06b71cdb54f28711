"""The toy task: deterministic, answers right (from parameters and from pixels), not guessable from text."""

import collections
import io
import random

import pytest
from PIL import Image

from data import toy


def test_generation_is_deterministic():
    a, _ = toy.make_rows(50, seed=3, split="train")
    b, _ = toy.make_rows(50, seed=3, split="train")
    c, _ = toy.make_rows(50, seed=3, split="val")
    assert a == b
    assert [r["problem"] for r in a] != [r["problem"] for r in c]


def cell_colours(png: bytes) -> list[str]:
    """Reads the grid back from the pixels: the colour nearest to each cell's centre pixel."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = []
    for i in range(4):
        x, y = (i % 2) * toy.CELL + toy.CELL // 2, (i // 2) * toy.CELL + toy.CELL // 2
        pixel = image.getpixel((x, y))
        out.append(min(toy.COLORS, key=lambda c: sum((p - q) ** 2 for p, q in zip(pixel, toy.COLORS[c]))))
    return out


def answer_from_pixels(row: dict) -> str:
    """Independent solver: parses the question text and counts colours in the image."""
    grid = cell_colours(row["images"][0]["bytes"])
    q = row["problem"].removeprefix("<image>")
    words = q.replace("?", "").replace(",", "").replace(".", "").split()
    if q.startswith("What colour"):
        position = toy.POSITIONS.index(words[4])
        return "ABCD"[row["choices"].index(grid[position])]
    if q.startswith("How many squares are"):
        return str(sum(c in (words[4], words[6]) for c in grid))
    if q.startswith("Count the"):
        k = sum(c == words[2] for c in grid)
        return str(k * int(words[6]) + int(words[9]))
    return str(sum(c == words[2] for c in grid))


def test_answers_match_the_drawing_parameters_and_the_pixels():
    rng = random.Random(0)
    for _ in range(300):
        ex = toy.sample_example(rng)
        _, answer = toy.solve(ex)
        row = {"problem": "<image>" + toy.question(ex), "images": [{"bytes": toy.png_bytes(toy.draw_grid(ex.grid))}],
               "choices": list(ex.choices)}  # fmt: skip
        assert answer_from_pixels(row) == answer
    rl_rows, sft_rows = toy.make_rows(200, seed=0, split="test")
    for rl, sft in zip(rl_rows, sft_rows):
        assert answer_from_pixels(rl) == rl["answer"]
        assert sft["messages"][1]["content"].endswith(f"<answer>\\boxed{{{rl['answer']}}}</answer>")
        assert sft["messages"][0]["content"] == rl["problem"]


def test_every_family_and_a_spread_of_answers():
    rows, _ = toy.make_rows(800, seed=0, split="train")
    families = collections.Counter(r["family"] for r in rows)
    assert set(families) == set(toy.FAMILIES) and min(families.values()) > 120
    mc = [r for r in rows if r["choices"]]
    assert mc and all(r["answer"] in "ABCD" for r in mc)
    counts = collections.Counter(r["answer"] for r in rows if r["family"] == "count")
    assert set(counts) == {"0", "1", "2", "3", "4"}


def test_answer_not_predictable_from_question_text():
    """The best text-only predictor (majority answer per exact question) stays near chance."""
    train, _ = toy.make_rows(4000, seed=0, split="train")
    test, _ = toy.make_rows(1000, seed=0, split="test")
    by_text = collections.defaultdict(collections.Counter)
    for r in train:
        by_text[r["problem"]][r["answer"]] += 1
    global_majority = collections.Counter(r["answer"] for r in train).most_common(1)[0][0]
    for family, chance in [("count", 1 / 5), ("either", 1 / 5), ("arith", 1 / 5), ("color", 1 / 4)]:
        rows = [r for r in test if r["family"] == family]
        hits = 0
        for r in rows:
            seen = by_text.get(r["problem"])
            guess = seen.most_common(1)[0][0] if seen else global_majority
            hits += guess == r["answer"]
        accuracy = hits / len(rows)
        assert accuracy < chance + 0.08, (family, accuracy)


def test_toy_model_folder_and_family_per_family(tmp_path):
    """`python -m data.toy --family F` writes runs/toy-init-F (the default Qwen2.5-VL toy stays in
    runs/toy-init, where every toy run reads it); a family without a toy is a one-line error."""
    assert toy.toy_model_dir() == toy.TOY_MODEL_DIR == toy.ROOT / "runs" / "toy-init"
    assert toy.toy_model_dir("qwen3_vl") == toy.ROOT / "runs" / "toy-init-qwen3_vl"
    assert set(toy.TOY_BUILDERS) == set(toy.TOY_FAMILIES)
    with pytest.raises(ValueError, match=r"^no toy for model family 'llava'; choose from \('qwen2_5_vl', "):
        toy.build_toy_model(tmp_path, family="llava")
