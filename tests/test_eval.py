"""eval.py: each benchmark's rule on hand-made rows, and an end-to-end run on local files."""

import io
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import eval as evaluation
import reward
from conftest import run_script
from data import toy
from mmr1 import benchmark_rules, benchmarks, dist


def boxed(answer: str) -> str:
    return f"<think>working</think><answer>\\boxed{{{answer}}}</answer>"


MV_QUESTION = "As shown in the figure, find the angle ABC.\nChoices:\nA:30°\nB:40°\nC:50°\nD:60°"
MATHVERSE = [
    ("B", {"answer": "B", "question_type": "multi-choice"}, True),
    ("(B)", {"answer": "B", "question_type": "multi-choice"}, True),
    ("B: 40°", {"answer": "B", "question_type": "multi-choice"}, True),
    ("C", {"answer": "B", "question_type": "multi-choice"}, False),
    ("40", {"answer": "B", "question_type": "multi-choice"}, False),
    ("2\\sqrt{3}", {"answer": "2\\sqrt{3}", "question_type": "free-form"}, True),
    ("\\sqrt{12}", {"answer": "2\\sqrt{3}", "question_type": "free-form"}, True),
    ("145°", {"answer": "145", "question_type": "free-form"}, True),
    ("0.5", {"answer": "\\frac{1}{2}", "question_type": "free-form"}, True),
    ("1.25", {"answer": "1.2", "question_type": "free-form"}, False),
    ("12", {"answer": "13", "question_type": "free-form"}, False),
    # option TEXT mapped to its letter, the options read from the question (MathVerse keeps them there)
    ("40°", {"answer": "B", "question_type": "multi-choice", "question": MV_QUESTION}, True),
    ("\\text{40}^\\circ", {"answer": "B", "question_type": "multi-choice", "question": MV_QUESTION}, True),
    ("50°", {"answer": "B", "question_type": "multi-choice", "question": MV_QUESTION}, False),
    ("B", {"answer": "B", "question_type": "multi-choice", "question": MV_QUESTION}, True),
    ("A", {"answer": "B", "question_type": "multi-choice", "question": MV_QUESTION}, False),
]

MATHVISTA = [
    ("B", {"answer": "4", "question_type": "multi_choice", "choices": ["3", "4", "5"], "answer_type": "text"}, True),
    ("4", {"answer": "4", "question_type": "multi_choice", "choices": ["3", "4", "5"], "answer_type": "text"}, True),
    ("A", {"answer": "4", "question_type": "multi_choice", "choices": ["3", "4", "5"], "answer_type": "text"}, False),
    (
        "(C) yes",
        {"answer": "yes", "question_type": "multi_choice", "choices": ["no", "maybe", "yes"], "answer_type": "text"},
        True,
    ),
    (
        "the square is larger",
        {"answer": "larger", "question_type": "multi_choice", "choices": ["smaller", "larger"], "answer_type": "text"},
        True,
    ),
    ("7", {"answer": "7", "question_type": "free_form", "answer_type": "integer"}, True),
    ("7.0", {"answer": "7", "question_type": "free_form", "answer_type": "integer"}, True),
    ("8", {"answer": "7", "question_type": "free_form", "answer_type": "integer"}, False),
    ("1.46", {"answer": "1.5", "question_type": "free_form", "answer_type": "float", "precision": 1.0}, True),
    ("1.44", {"answer": "1.5", "question_type": "free_form", "answer_type": "float", "precision": 1.0}, False),
    ("3.142", {"answer": "3.14", "question_type": "free_form", "answer_type": "float", "precision": 2.0}, True),
    ("[1, 2, 3]", {"answer": "[1,2,3]", "question_type": "free_form", "answer_type": "list"}, True),
    ("[1, 2]", {"answer": "[1,2,3]", "question_type": "free_form", "answer_type": "list"}, False),
]

MATHVISION = [
    ("A", {"answer": "A", "options": ["1", "2", "3", "4", "5"]}, True),
    ("(A)", {"answer": "A", "options": ["1", "2", "3", "4", "5"]}, True),
    ("1", {"answer": "A", "options": ["1", "2", "3", "4", "5"]}, True),  # option text for the gold letter
    ("2", {"answer": "A", "options": ["1", "2", "3", "4", "5"]}, False),
    ("E", {"answer": "A", "options": ["1", "2", "3", "4", "5"]}, False),
    ("\\frac{1}{2}", {"answer": "C", "options": ["1", "2", "\\frac{1}{2}", "4", "5"]}, True),
    ("0.5", {"answer": "C", "options": ["1", "2", "\\frac{1}{2}", "4", "5"]}, True),
    ("7", {"answer": "7", "options": []}, True),
    ("\\frac{3}{4}", {"answer": "0.75", "options": []}, True),
    ("2\\pi", {"answer": "2\\pi", "options": []}, True),
    ("3\\pi", {"answer": "2\\pi", "options": []}, False),
]

LOGICVISTA = [
    ("A", {"answer": "A"}, True),
    ("(A)", {"answer": "A"}, True),
    ("B", {"answer": "A"}, False),
    ("A, C", {"answer": "A, C"}, True),
    ("C, A", {"answer": "A, C"}, True),
    ("AC", {"answer": "A, C"}, True),
    ("(A) and (C)", {"answer": "A, C"}, True),
    ("A", {"answer": "A, C"}, False),
    ("A, B, C", {"answer": "A, C"}, False),
    ("D", {"answer": "D"}, True),
    ("", {"answer": "D"}, False),
]

CHARTQA = [
    ("23", {"answer": "23"}, True),
    ("24", {"answer": "23"}, True),  # within 5%
    ("25", {"answer": "23"}, False),
    ("0", {"answer": "0"}, True),  # target 0: exact match
    ("0.01", {"answer": "0"}, False),
    ("45%", {"answer": "0.45"}, True),
    ("45%", {"answer": "45%"}, True),
    ("1,000", {"answer": "1000"}, True),
    ("Yes", {"answer": "yes"}, True),
    ("United States", {"answer": "united states"}, True),
    ("Canada", {"answer": "united states"}, False),
]

TABLE = [("mathverse", MATHVERSE), ("mathvista", MATHVISTA), ("mathvision", MATHVISION), ("logicvista", LOGICVISTA),
         ("chartqa", CHARTQA)]  # fmt: skip


@pytest.mark.parametrize("benchmark, cases", TABLE)
def test_benchmark_rules(benchmark, cases):
    assert len(cases) >= 10
    for pred, row, expected in cases:
        assert evaluation.score_answer(benchmark, boxed(pred), row) is expected, (pred, row)


def test_rules_without_an_answer_and_the_toy_rule():
    assert evaluation.score_answer("chartqa", "no box here", {"answer": "3"}) is False
    assert evaluation.score_answer("toy", boxed("B"), {"answer": "B", "choices": ["a", "b"]})
    assert evaluation.score_answer("toy", boxed("b"), {"answer": "B", "choices": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown benchmark"):
        evaluation.score_answer("mmmu", boxed("A"), {"answer": "A"})


def test_most_similar_option():
    assert benchmark_rules.most_similar_option("larger one", ["smaller", "larger"]) == 1
    assert benchmark_rules.chosen_option("B", ["x", "y"]) == 1 and benchmark_rules.chosen_option("y", ["x", "y"]) == 1
    assert benchmark_rules.most_similar_option("", ["x"]) is None


def png(colours=("red", "blue", "green", "yellow")) -> dict:
    buffer = io.BytesIO()
    toy.draw_grid(list(colours)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def local_benchmarks(tmp_path) -> str:
    """Tiny files in each benchmark's real column layout (one malformed MathVista row, one MathVerse Vision
    Only row whose question is in the image)."""
    import datasets

    files = {
        "mathverse": [{"sample_index": str(i), "question": q, "image": png(), "answer": "1", "question_type": "free-form",
                       "problem_version": v, "metadata": {"subject": "Counting"}, "query_cot": f"Please answer. {q}"}
                      for i, (v, q) in enumerate([("Text Lite", "How many red squares?"), ("Vision Only", "")])],
        "mathvista": [{"pid": "1", "question": "Which colour is top-left?", "decoded_image": png(), "choices": ["red", "blue"],
                       "answer": "red", "question_type": "multi_choice", "answer_type": "text", "precision": None},
                      {"pid": "2", "question": "Count?", "decoded_image": png(), "choices": None, "answer": "3",
                       "question_type": "free_form", "answer_type": "integer", "precision": None, "unit": "g"},
                      {"pid": "3", "question": "Broken", "decoded_image": None, "choices": None, "answer": "3",
                       "question_type": "free_form", "answer_type": "integer", "precision": None}],
        "mathvision": [{"id": "1", "question": "Pick", "options": ["1", "2", "3", "4", "5"], "decoded_image": png(),
                        "answer": "A"}],
        "logicvista": [{"question": "Which?", "image": png(), "answer": "A, C", "skill": ["inductive"]}],
        "chartqa": [{"question": "Value?", "image": png(), "answer": "12", "type": "human_test"},
                    {"question": "Value?", "image": png(), "answer": "0", "type": "augmented_test"}],
    }  # fmt: skip
    specs = []
    for name, rows in files.items():
        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        specs.append(f"{name}={path}")
    return ",".join(specs)


def test_eval_end_to_end_on_local_files(toy_dir, tmp_path):
    overrides = local_benchmarks(tmp_path)
    out = run_script(["eval.py", "--model", str(toy_dir / "model"), "--bench-data", overrides, "--engine", "hf",
                      "--max-new-tokens", "8", "--min-pixels", "3136", "--max-pixels", "50176",
                      "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert "skipped malformed mathvista row 2 (id=3): no image" in out.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    (model_results,) = results.values()
    assert set(model_results) == {"mathverse", "mathvista", "mathvision", "logicvista", "chartqa"}
    assert model_results["mathvista"]["n"] == 2 and model_results["mathvista"]["skipped"] == 1
    assert model_results["mathverse"]["n"] == 2 and model_results["mathverse"]["skipped"] == 0  # Vision Only too
    assert set(model_results["mathverse"]["breakdown"]["problem_version"]) == {"Text Lite", "Vision Only"}
    assert model_results["mathverse"]["breakdown"]["subject"]["Counting"]["n"] == 2
    assert set(model_results["chartqa"]["breakdown"]["type"]) == {"human_test", "augmented_test"}
    assert (
        set(model_results["mathvision"]["breakdown"]) == set() and "skill" in model_results["logicvista"]["breakdown"]
    )
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "MMR1-7B (paper) | 55.4 | 72.0 | 31.8 | 48.9 | 83.7 | 58.4" in table
    assert "mathverse by problem_version:" in table and "| model | Text Lite (n=1) | Vision Only (n=1) |" in table
    lines = [json.loads(x) for x in (tmp_path / "eval" / "model" / "chartqa.jsonl").read_text().splitlines()]
    assert [set(r) >= {"id", "response", "extracted", "gold", "correct", "groups"} for r in lines] == [True, True]


def test_mathverse_options_and_the_paper_settings():
    assert benchmark_rules.mathverse_options(MV_QUESTION) == ["30°", "40°", "50°", "60°"]
    assert benchmark_rules.mathverse_options("Choices:\n(A) 1\n(B) 2") == ["1", "2"]
    assert (
        benchmark_rules.mathverse_options("no options here") == []
        and benchmark_rules.mathverse_options("Choices:\nB:1") == []
    )
    cfg = evaluation.EvalConfig()
    assert cfg.max_new_tokens >= 4096  # the RL stage's response length: a long answer keeps its \\boxed{}
    assert (
        evaluation.run_name("runs/mmr1-7b-grpo/final") == "mmr1-7b-grpo"
        and evaluation.run_name("a/b/step-5") == "b-step-5"
    )


# ---------------------------------------------------------------------------------------------
# Issue 28: exact numbers in the benchmark rules, linear-time cleaning, scoring in workers with a hard
# limit per answer, one per-sample folder per model
# ---------------------------------------------------------------------------------------------

VISTA_INT = {"question_type": "free_form", "answer_type": "integer", "precision": None, "unit": "g"}
EXACT = [
    ("mathvista", "1000001", {**VISTA_INT, "answer": "1000000"}, False),
    ("mathvista", "12345678901234567891 g", {**VISTA_INT, "answer": "12345678901234567890"}, False),
    ("mathvista", "12345678901234567890 g", {**VISTA_INT, "answer": "12345678901234567890"}, True),
    ("mathvista", "1\u202f000 g", {**VISTA_INT, "answer": "1000"}, True),
    ("mathvista", "1 001 g", {**VISTA_INT, "answer": "1000"}, False),
    ("mathverse", "3628803", {"answer": "3628800", "question_type": "free-form"}, False),
    ("mathverse", "123456788", {"answer": "123456789", "question_type": "free-form"}, False),
    ("mathverse", "3\u00a0628\u00a0800", {"answer": "3628800", "question_type": "free-form"}, True),
    ("mathvision", "1000001", {"answer": "1000000"}, False),
    ("chartqa", "1 000", {"answer": "1000"}, True),
    ("chartqa", "1\u2009000", {"answer": "1000"}, True),
    ("chartqa", "1 00", {"answer": "100"}, False),  # not groups of three: text, and not equal
]


@pytest.mark.parametrize("benchmark, pred, row, expected", EXACT)
def test_benchmark_rules_compare_numbers_exactly(benchmark, pred, row, expected):
    assert evaluation.score_answer(benchmark, boxed(pred), row) is expected


def slow_job(benchmark: str, response: str, row: dict) -> dict:
    """benchmarks.score_job, but an answer 'SLOW' takes far longer than any time limit of the test."""
    if "SLOW" in response:
        time.sleep(600)
    return benchmarks.score_job(benchmark, response, row)


class CannedEngine:
    """An engine that answers each prompt with the text its row's id maps to."""

    prompt_format = None

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, rows, n, sampling):
        return [SimpleNamespace(text=self.answers[r["id"]]) for r in rows]


def test_eval_scores_in_workers_and_counts_a_timed_out_answer():
    rows, _ = toy.make_rows(3, 0, "test")
    answers = {r["id"]: boxed(r["answer"]) for r in rows}
    answers[rows[1]["id"]] = boxed("SLOW")
    cfg = evaluation.EvalConfig(min_pixels=3136, max_pixels=50176, max_new_tokens=8)
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    # 2 s: the answers take milliseconds to score; the slow one would take 600 s
    with reward.RewardPool(1, 2.0, score_fn=slow_job, timeout_result=benchmarks.timed_out_job) as pool:
        records, bad = evaluation.evaluate_benchmark(CannedEngine(answers), "toy", rows, cfg, one, pool)
    assert bad == [] and [r["correct"] for r in records] == [True, False, True]
    assert [r["timed_out"] for r in records] == [False, True, False]
    assert evaluation.summarise(records)["timed_out"] == 1
    # the pathological answer of the issue, through eval's own pool: linear-time cleaning, scored (wrong)
    hostile = boxed(" " * 40_000 + "g")
    with evaluation.scoring_pool() as pool:
        (scored,) = evaluation.score_outputs("mathvista", [{"benchmark_row": {**VISTA_INT, "answer": "5"}}],
                                              [SimpleNamespace(text=hostile)], pool)  # fmt: skip
    assert scored == {"correct": False, "timed_out": False}


def test_output_folders_are_unique_per_model(tmp_path):
    out = tmp_path / "eval"
    folders = evaluation.output_folders(
        ["exp1/toy/final", "exp2/toy/final", "runs/toy/step-5", "Qwen/Qwen2.5-VL-7B"], out
    )
    assert {m: f.name for m, f in folders.items()} == {
        "exp1/toy/final": "toy",
        "exp2/toy/final": "exp2-toy",
        "runs/toy/step-5": "toy-step-5",
        "Qwen/Qwen2.5-VL-7B": "Qwen2.5-VL-7B",
    }
    evaluation.write_samples(folders["exp1/toy/final"], "exp1/toy/final", "toy", [])
    # a later evaluation of exp2 alone does not take exp1's folder; exp1 gets its own back
    assert evaluation.output_folders(["exp2/toy/final"], out)["exp2/toy/final"].name == "exp2-toy"
    assert evaluation.output_folders(["exp1/toy/final"], out)["exp1/toy/final"].name == "toy"
    same = evaluation.output_folders(["a/toy/final", "b/a/toy/final"], tmp_path / "other")
    assert len({f.name for f in same.values()}) == 2


def test_eval_two_same_named_runs_keep_both_records(toy_dir, tmp_path):
    """exp1/toy/final and exp2/toy/final: both end in 'toy'; before, the second overwrote the first's records."""
    import datasets

    for run in ("exp1", "exp2"):
        shutil.copytree(toy_dir / "model", tmp_path / run / "toy" / "final")
    data = tmp_path / "chartqa.parquet"
    datasets.Dataset.from_list(
        [{"question": "Value?", "image": png(), "answer": "12", "type": "human_test"}]
    ).to_parquet(str(data))
    models = [str(tmp_path / run / "toy" / "final") for run in ("exp1", "exp2")]
    run_script(["eval.py", "--model", ",".join(models), "--benchmarks", "chartqa", "--bench-data", f"chartqa={data}",
                "--engine", "hf", "--max-new-tokens", "4", "--min-pixels", "3136", "--max-pixels", "50176",
                "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    folders = sorted(p for p in (tmp_path / "eval").iterdir() if p.is_dir())
    assert len(folders) == 2
    held = {json.loads((f / "model.json").read_text())["model"] for f in folders}
    assert held == {str(Path(m).resolve()) for m in models}
    assert all(len((f / "chartqa.jsonl").read_text().splitlines()) == 1 for f in folders)
