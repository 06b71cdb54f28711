"""The `slip` toy variant (the RL bench): right RL answers, SFT traces that slip at the set rate on x3 rows only."""

import math
import re

import pytest
from test_toy import answer_from_pixels, cell_colours

from data import toy

# "I see k red squares. k <op> mul = m. m + add = r." and the boxed answer after it
TRACE = re.compile(
    r"<think>I see (\d) red squares\. (\d) ([x+]) (\d) = (\d+)\. (\d+) \+ (\d) = (\d+)\.</think>"
    r"<answer>\\boxed\{(\d+)\}</answer>"
)


@pytest.fixture(scope="module")
def train_rows() -> tuple[list[dict], list[dict]]:
    return toy.make_rows(1500, seed=0, split="train", variant="slip")


def test_slip_generation_is_deterministic_and_share_free():
    a = toy.make_rows(60, seed=3, split="train", variant="slip")
    assert a == toy.make_rows(60, seed=3, split="train", variant="slip")
    assert a[0] != toy.make_rows(60, seed=3, split="val", variant="slip")[0]
    # the slip has its own random stream: the rows (RL side) do not depend on the share
    rl_none, sft_none = toy.make_rows(60, seed=3, split="train", variant="slip", slip_share=0.0)
    assert rl_none == a[0] and not any(r["slip"] for r in sft_none)
    assert toy.make_rows(5, seed=3, split="train") != toy.make_rows(5, seed=3, split="train", variant="slip")


def test_slip_rows_are_arith_counting_one_colour_with_right_rl_answers(train_rows):
    """RL rows: the answer of solve(), recomputed from the pixels; every row arith on red."""
    rl_rows, _ = train_rows
    for split in ("val", "test"):
        rl_rows = rl_rows + toy.make_rows(200, seed=0, split=split, variant="slip")[0]
    for row in rl_rows:
        assert row["family"] == "arith" and row["problem"].startswith("<image>Count the red squares, multiply by")
        assert answer_from_pixels(row) == row["answer"]
    muls = {int(re.search(r"multiply by (\d)", r["problem"]).group(1)) for r in rl_rows}
    assert muls == {1, 2, 3}


def test_traces_slip_only_on_x3_rows_and_the_boxed_answer_follows(train_rows):
    rl_rows, sft_rows = train_rows
    for rl, sft in zip(rl_rows, sft_rows):
        assert sft["messages"][0]["content"] == rl["problem"]
        k, k2, op, mul, m, m2, add, result, boxed = TRACE.fullmatch(sft["messages"][1]["content"]).groups()
        assert k == k2 and m == m2 and result == boxed  # the trace is consistent with itself
        assert mul == re.search(r"multiply by (\d)", rl["problem"]).group(1)
        assert add == re.search(r"then add (\d)", rl["problem"]).group(1)
        if sft["slip"]:
            assert mul == str(toy.SLIP_MUL) and op == "+"
            assert int(m) == int(k) + int(mul) and boxed != rl["answer"]  # a slip always changes the answer
        else:
            assert op == "x" and int(m) == int(k) * int(mul) and boxed == rl["answer"]


def test_traces_count_right():
    """The counted number in every trace (slipped or not) is the number of red cells in the image."""
    rl_rows, sft_rows = toy.make_rows(200, seed=1, split="train", variant="slip")
    for rl, sft in zip(rl_rows, sft_rows):
        grid = cell_colours(rl["images"][0]["bytes"])
        assert TRACE.fullmatch(sft["messages"][1]["content"]).group(1) == str(grid.count("red"))


@pytest.mark.parametrize("share", [toy.SLIP_SHARE, 0.25])
def test_slip_rate_within_a_binomial_bound(train_rows, share):
    """Among x3 rows, slips ~ Binomial(M, share) (one independent draw per row, its own stream).

    A 4.5-sigma bound |rate - share| <= 4.5 sqrt(share (1 - share) / M) fails for a correct
    generator with probability < 1e-5 (normal tail 6.8e-6), so it holds for any seed, not just
    this one; with M ~ 500 x3 rows it still catches a share off by 0.1. The overall rate is
    share / 3 with the x3 share itself Binomial(n, 1/3), bounded the same way."""
    rl_rows, sft_rows = train_rows if share == toy.SLIP_SHARE else toy.make_rows(1500, 0, "train", "slip", share)
    x3 = [s["slip"] for r, s in zip(rl_rows, sft_rows) if "multiply by 3" in r["problem"]]
    m = len(x3)
    assert abs(m / len(rl_rows) - 1 / 3) <= 4.5 * math.sqrt((1 / 3) * (2 / 3) / len(rl_rows))
    assert abs(sum(x3) / m - share) <= 4.5 * math.sqrt(share * (1 - share) / m)
    assert not any(s["slip"] for r, s in zip(rl_rows, sft_rows) if "multiply by 3" not in r["problem"])


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown toy variant"):
        toy.make_rows(1, 0, "train", variant="nope")


def test_toy_flag_points_every_stage_at_the_slip_toy(tmp_path, monkeypatch):
    """--toy slip: sft.py trains on data/toy-slip into runs/toy-slip-sft, grpo.py starts from that
    checkpoint on the slip RL rows with greedy validation, eval.py scores the slip test split."""
    import grpo
    import sft

    monkeypatch.setattr(toy, "ROOT", tmp_path)  # run_dir() reads it: no real runs/ is touched
    monkeypatch.setattr(toy, "ensure_toy", lambda **kw: None)
    slip = toy.VARIANT_DATA_DIRS["slip"]

    cfg = sft.SFTConfig(toy="slip")
    sft.use_toy_defaults(cfg)
    assert (cfg.data, cfg.acc_data) == (f"{slip / 'sft'}@train", f"{slip / 'rl'}@val")
    assert cfg.output_dir == "runs/toy-slip-sft"

    with pytest.raises(SystemExit, match="python sft.py --toy slip"):  # no SFT checkpoint yet
        grpo.use_toy_defaults(grpo.GRPOConfig(toy="slip"))
    (tmp_path / "runs" / "toy-slip-sft" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "toy-slip-sft" / "final" / "config.json").write_text("{}")
    cfg = grpo.GRPOConfig(toy="slip")
    grpo.use_toy_defaults(cfg)
    assert cfg.model == str(tmp_path / "runs" / "toy-slip-sft" / "final")
    assert (cfg.data, cfg.val_data) == (f"{slip / 'rl'}@train", f"{slip / 'rl'}@val")
    assert (cfg.output_dir, cfg.val_temperature) == ("runs/toy-slip-grpo", 0.0)
    cfg = grpo.GRPOConfig(toy="slip", val_temperature=0.7)  # an explicit temperature is kept
    grpo.use_toy_defaults(cfg)
    assert cfg.val_temperature == 0.7
