"""The benchmark rules against the benchmarks' own scorers, on rows laid out exactly as the published files
write them (MathVerse data/testmini_text_only.json, MathVista data/testmini.json, MATH-V data/test.jsonl;
images left out), then one systematic table per benchmark: for each gold layout, the gold, its
equivalent forms and its option letter score 1; off by one, the wrong sign, the wrong option and the
wrong rounding score 0. Also: the fields a MathVista rule reads, the eval output folder's model record,
deeply nested --bench-data, and `eval.py --compare-official`.
"""

import json
import subprocess
import sys

import pytest

import eval as evaluation
from conftest import ROOT, launch
from mmr1 import benchmark_rules, benchmarks, config


def boxed(answer: str) -> str:
    return f"<think>working</think><answer>\\boxed{{{answer}}}</answer>"


def misjudged(benchmark: str, row: dict, right: list[str], wrong: list[str]) -> list[str]:
    """The answers scored against expectation: a right one scored 0 or a wrong one scored 1."""
    out = [f"right {p!r} scored 0" for p in right if not evaluation.score_answer(benchmark, boxed(p), row)]
    return out + [f"wrong {p!r} scored 1" for p in wrong if evaluation.score_answer(benchmark, boxed(p), row)]


# --- MathVerse (ZrrSkywalker/MathVerse data/testmini_text_only.json; hub rows add question_for_eval) ---


def mathverse_row(index: str, question: str, answer: str, question_type: str, subject: str, subfield: str) -> dict:
    """A Text Only row as the published file writes it (query_wo left out: no rule or prompt reads it)."""
    instruction = "the correct option letter, e.g., A, B, C, D" if question_type == "multi-choice" else (
        "the final value, e.g., 1, 2.5, 300")  # fmt: skip
    return {"sample_index": index, "problem_index": index, "problem_version": "Text Only", "question": question,
            "image": "", "answer": answer, "question_type": question_type,
            "metadata": {"split": "testmini", "source": "Geo2D_collected", "subject": subject, "subfield": subfield},
            "query_cot": f"Please first conduct reasoning, and then answer the question and provide {instruction}, "
            f"at the end.\nQuestion: {question}"}  # fmt: skip


def vision_only(row: dict) -> dict:
    """The same problem as the hub's Vision Only version writes it: the question (choices included) only in
    the image and in `question_for_eval`."""
    return {**row, "problem_version": "Vision Only", "question": "", "question_for_eval": row["question"]}


# `Name $=value unit$` golds (samples 395, 514, 653, 508, 473): (row, right answers, wrong answers)
MATHVERSE_NAMED = [
    (mathverse_row("395", "A circle with a radius of $3 \\mathrm{~cm}$. Find the exact area of the circle shown.\n\n"
                   "Give your answer as an exact value in terms of $\\pi $.", "Area $=9 \\pi \\mathrm{cm}^{2}$",
                   "free-form", "Plane Geometry", "Area"),
     ["9 \\pi", "9\\pi", "9\\pi \\text{ cm}^2", "9\\pi \\mathrm{~cm}^{2}", "Area = 9\\pi", "Area $=9 \\pi \\mathrm{cm}^{2}$"],
     ["10\\pi", "-9\\pi", "8\\pi", "9", "18\\pi"]),
    (mathverse_row("514", "The graph shows the temperature of a room after the heater has been turned on. What is the "
                   "slope of the shown function that passes the point (0, 1)?\n", "Slope $=\\frac{1}{5}$",
                   "free-form", "Functions", "Applied"),
     ["\\frac{1}{5}", "1/5", "0.2", "\\dfrac{1}{5}"], ["-\\frac{1}{5}", "\\frac{1}{4}", "\\frac{2}{5}", "5", "0.25"]),
    (mathverse_row("653", "Find the volume of the following hemisphere. The radius is 6.\n\nRound your answer to "
                   "three decimal places.", "Volume $=452.389$ cubic units", "free-form", "Solid Geometry", "Volume"),
     ["452.389", "452.389 cubic units", "V = 452.389"], ["452.39", "452.4", "453.389", "452.388", "-452.389"]),
    (mathverse_row("508", "Consider the graph of the line whose x-intercept is 0.5 and y-intercept is 2. What is the "
                   "slope of the line?\n", "slope =-4", "free-form", "Functions", "Property"),
     ["-4", "m = -4", "slope = -4"], ["4", "-3", "-5", "\\frac{1}{4}"]),
    (mathverse_row("473", "A rectangle contains an ellipse. ... State the coordinates of the center of the cake in "
                   "the form $(a, b)$.\n", "Center $=(20,10)$", "free-form", "Plane Geometry", "Applied"),
     ["(20,10)", "(20, 10)"], ["(10,20)", "(20,-10)", "(21,10)", "(20,11)", "20"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "row, right, wrong", MATHVERSE_NAMED, ids=lambda x: x["sample_index"] if isinstance(x, dict) else ""
)
def test_mathverse_named_value_golds_score_the_bare_value(row, right, wrong):
    """The value after `Name =`, without its unit, is the answer, in every problem version."""
    assert misjudged("mathverse", row, right, wrong) == []
    assert misjudged("mathverse", vision_only(row), right, wrong) == []


# Rows whose choices header is singular (samples 339, 340, 429, 430): every one of them
MATHVERSE_SINGULAR = [
    mathverse_row("339", "In the figure below, point B is due East of point A. Triangle ABC formed by the dashed line, "
                  "angle A is 49° and angle B is 41°. Find the true bearing of point B from point A.\nChoice:\n"
                  "A. 090^\\circ T\nB. 180^\\circ T\nC. 049^\\circ T\nD. 041^\\circ T", "090^\\circ T", "multi-choice",
                  "Plane Geometry", "Angle"),
    mathverse_row("340", "Consider the following diagram. Triangle ABC formed by the dashed line, angle A is 49° and "
                  "angle B is 41°.\n\nFind the true bearing of point B from point C.\nChoice:\nA. 053 ^\\circ T\n"
                  "B. 082 ^\\circ T\nC. 045 ^\\circ T\nD. 037 ^\\circ T", "053 ^\\circ T", "multi-choice",
                  "Plane Geometry", "Angle"),
    mathverse_row("429", "A driver glances up at the top of a building.\n\nTrue or false: According to the angle A, the "
                  "distance from the driver to the building would be the opposite side.\nChoice:\nA. True\nB. False",
                  "False", "multi-choice", "Plane Geometry", "Applied"),
    mathverse_row("430", "Sally needs to walk from the school to the bus stop.\n\nTrue or False : The quickest way to "
                  "get there will be through the playground.\nChoice:\nA. False\nB. True", "False", "multi-choice",
                  "Plane Geometry", "Applied"),
]  # fmt: skip


@pytest.mark.parametrize("row", MATHVERSE_SINGULAR, ids=lambda r: r["sample_index"])
def test_mathverse_singular_choice_header(row):
    """`Choice:` lists the options as `Choices:` does: the gold option's letter scores, the others do not."""
    options = benchmark_rules.mathverse_options(row["question"])
    gold = next(i for i, o in enumerate(options) if o == row["answer"])
    letters = "ABCD"[: len(options)]
    right = [letters[gold], f"({letters[gold]})", options[gold]]
    wrong = [letter for letter in letters if letter != letters[gold]] + [o for o in options if o != options[gold]]
    assert misjudged("mathverse", row, right, wrong) == []
    assert misjudged("mathverse", vision_only(row), right, wrong) == []


# --- MathVista (lupantech/MathVista data/testmini.json, the hub's columns) ------------------------------


def mathvista_row(pid: str, question: str, choices, answer: str, answer_type: str, precision=None, unit=None) -> dict:
    return {"question": question, "image": f"images/{pid}.jpg", "decoded_image": None, "choices": choices,
            "unit": unit, "precision": precision, "answer": answer,
            "question_type": "multi_choice" if choices else "free_form", "answer_type": answer_type, "pid": pid,
            "metadata": {"split": "testmini", "language": "english"}}  # fmt: skip


# Options written as lower-case letters in parentheses (pids 168, 849, the only two)
VISTA_168 = mathvista_row(
    "168",
    "Given that the Hue-Saturation subspace shown in Fig. Q2 is a perfect circle and that "
    "colors A, B and C can be represented as the 3 points shown in the subspace. Which color has "
    "the smallest saturation coefficient?",
    ["(c)", "(a)", "(e)", "(d)", "(b)"],
    "(b)",
    "text",
)
VISTA_849 = mathvista_row("849", "The 4 8x8 images shown below are encoded with JPEG coding. Based on their expected DCT "
                          "(Discrete Cosine Transform) coefficients, Which image has the most non-zero AC coefficients? "
                          "(a): Image A, (b): Image B, (c): Image C, (d): Image D.", ["(c)", "(d)", "(a)", "(b)", "(e)"],
                          "(b)", "text")  # fmt: skip


def test_mathvista_parenthesised_lower_case_options_read_letters_first():
    """calculate_score reads `(x)` as the letter X before anything else: `(E)` and `(e)` name option E
    ('(b)' for pid 168), and the option text `(b)` itself names option B, as the official rule has it."""
    assert misjudged("mathvista", VISTA_168, ["E", "(E)", "(e)"], ["(b)", "B", "(C)", "(c)", "A"]) == []
    assert misjudged("mathvista", VISTA_849, ["D", "(D)", "(d)"], ["(b)", "B", "(E)", "C"]) == []


# --- The systematic table: per benchmark, each gold layout with right and wrong answers -----------------
# Each case: (layout, row, right answers, {kind of wrong answer: answer}). Wrong kinds: off by one, wrong
# sign, wrong option, wrong rounding (where the layout has them).

MV_PLURAL = "Find x.\nChoices:\nA:$\\frac{\\sqrt{3}}{2}$\nB:$\\frac{1}{2}$\nC:30°\nD:60°"
MV_INLINE = "Find y.\nChoices: A. 148^\\circ B. 152^\\circ C. 180^\\circ D. 32^\\circ"
MATHVERSE = [
    ("value after =, unit as \\mathrm{}^2",
     mathverse_row("393", "Find the area.", "Area $=113.1 \\mathrm{~cm}^{2}$", "free-form", "Plane Geometry", "Area"),
     ["113.1", "113.1 cm^2", "113.1 \\text{ cm}^{2}", "A = 113.1"],
     {"off by one": "114.1", "wrong sign": "-113.1", "wrong rounding": "113"}),
    ("unit as \\mathrm{} without =", mathverse_row("404", "Find the area.", "7298.6737 \\mathrm{~mm}^{2}", "free-form",
                                                   "Plane Geometry", "Area"),
     ["7298.6737", "7298.6737 mm^2"], {"off by one": "7299.6737", "wrong sign": "-7298.6737", "wrong rounding": "7298.67"}),
    ("unit as words", mathverse_row("743", "Find the length.", "24 units", "free-form", "Plane Geometry", "Length"),
     ["24", "24 units"], {"off by one": "25", "wrong sign": "-24"}),
    ("unit as a word after =", mathverse_row("694", "Find the intake.", "Weekly water intake $=15.5$ Litres",
                                             "free-form", "Solid Geometry", "Volume"),
     ["15.5", "15.5 litres"], {"off by one": "16.5", "wrong sign": "-15.5", "wrong rounding": "16"}),
    ("degrees", mathverse_row("372", "Find the angle.", "60^\\circ ", "free-form", "Plane Geometry", "Angle"),
     ["60", "60°", "60^{\\circ}", "60 degrees"], {"off by one": "61°", "wrong sign": "-60°"}),
    ("a true bearing", mathverse_row("332", "Find the bearing.", "230 ^\\circ T", "free-form", "Plane Geometry",
                                     "Angle"),
     ["230", "230°", "230^\\circ T"], {"off by one": "231°", "wrong sign": "-230°"}),
    ("fraction gold, decimal answers", mathverse_row("441", "Find cos.", "$\\frac{4}{5}$", "free-form", "Functions",
                                                     "Property"),
     ["\\frac{4}{5}", "0.8", "4/5"], {"off by one": "\\frac{5}{5}", "wrong sign": "-\\frac{4}{5}", "wrong rounding": "0.75"}),
    ("an equation kept whole", mathverse_row("434", "Find the equation.", "\\frac{x^2}{81}+\\frac{y^2}{9}=1",
                                             "free-form", "Analytic Geometry", "Equation"),
     ["\\frac{x^2}{81}+\\frac{y^2}{9}=1"], {"off by one": "2", "wrong option": "1"}),
    ("a point", mathverse_row("627", "Find the point.", "$(4,0)$", "free-form", "Functions", "Coordinate"),
     ["(4,0)", "(4, 0)"], {"off by one": "(5,0)", "wrong sign": "(-4,0)", "wrong option": "(0,4)"}),
    ("plural header, option text with $", mathverse_row("11", MV_PLURAL, "B", "multi-choice", "Plane Geometry", "Angle"),
     ["B", "(B)", "B: $\\frac{1}{2}$", "\\frac{1}{2}", "0.5"], {"wrong option": "A", "wrong sign": "-\\frac{1}{2}"}),
    ("plural header, degree text without $", mathverse_row("12", MV_PLURAL, "D", "multi-choice", "Plane Geometry",
                                                           "Angle"),
     ["D", "60°", "60"], {"off by one": "61°", "wrong option": "C", "wrong sign": "-60°"}),
    ("choices on one line", mathverse_row("13", MV_INLINE, "A", "multi-choice", "Plane Geometry", "Angle"),
     ["A", "148^\\circ", "148"], {"off by one": "149", "wrong option": "B"}),
    ("singular header, gold as option text", MATHVERSE_SINGULAR[0], ["A", "090^\\circ T", "090°"],
     {"wrong option": "B", "off by one": "091°"}),
]  # fmt: skip

MATHVISTA = [
    ("upper-case letter options", mathvista_row("10", "Which object comes next?", ["A", "B", "C", "D", "E"], "E",
                                                "text"), ["E", "(E)"], {"wrong option": "D"}),
    ("lower-case letters in parentheses", VISTA_168, ["E", "(e)"], {"wrong option": "(D)"}),
    ("degree option text", mathvista_row("3", "Find ∠BOC.", ["135°", "140°", "145°", "150°"], "145°", "text"),
     ["C", "(C)", "145°"], {"wrong option": "B"}),
    ("integer", mathvista_row("45", "What is the value?", None, "-3", "integer"), ["-3", "-3.0"],
     {"off by one": "-4", "wrong sign": "3"}),
    ("integer with a unit column", mathvista_row("2", "what is the total volume of the measuring cup?", None, "1000",
                                                 "integer", unit="g"), ["1000", "1000 g", "1,000"],
     {"off by one": "1001", "wrong sign": "-1000"}),
    ("float at precision 1", mathvista_row("1", "By what distance is the spring compressed?", None, "1.2", "float",
                                           precision=1), ["1.2", "1.23", "1.16"],
     {"off by one": "1.3", "wrong sign": "-1.2", "wrong rounding": "1.26"}),
    ("float at precision 2", mathvista_row("108", "Find out the average of the bottom two countries ??", None, "51.04",
                                           "float", precision=2), ["51.04", "51.041", "51.036"],
     {"off by one": "51.05", "wrong sign": "-51.04", "wrong rounding": "51.0"}),
    ("list", mathvista_row("506", "Between which two years does the line graph saw its maximum peak?", None,
                           "[2014, 2016]", "list"), ["[2014, 2016]", "[2014,2016]"],
     {"off by one": "[2014, 2017]", "wrong option": "[2016, 2014]"}),
]  # fmt: skip


def mathvision_row(id_: str, question: str, options: list[str], answer: str) -> dict:
    return {"id": id_, "question": question, "options": options, "answer": answer, "solution": None, "level": 4,
            "subject": "metric geometry - angle", "image": f"images/{id_}.jpg"}  # fmt: skip


DEGREES = ["$90^{\\circ}$", "$100^{\\circ}$", "$110^{\\circ}$", "$120^{\\circ}$", "$135^{\\circ}$"]
MATHVISION = [
    ("option text with $ and degrees", mathvision_row("183", "∠BAD is equal to:\n<image1>", DEGREES, "D"),
     ["D", "(D)", "d", "$120^{\\circ}$", "120^\\circ", "120°", "120"],
     {"off by one": "121°", "wrong sign": "-120°", "wrong option": "C"}),
    ("option text with $ and a unit", mathvision_row("91", "How long is the room? <image1>",
                                                     ["$6 \\mathrm{~m}$", "$8 \\mathrm{~m}$", "$10 \\mathrm{~m}$",
                                                      "$11 \\mathrm{~m}$", "$12 \\mathrm{~m}$"], "E"),
     ["E", "12", "12 m", "x = 12"], {"off by one": "11", "wrong sign": "-12", "wrong option": "D"}),
    ("option text without $", mathvision_row("55", "Which word is formed?\n<image1>",
                                             ["KNAO", "KNGO", "KNR", "AGRO", "KAO"], "A"),
     ["A", "KNAO", "knao"], {"wrong option": "KAO"}),
    ("negative integer", mathvision_row("203", "What is the value of $b$?\n<image1>", [], "-2"), ["-2", "b = -2"],
     {"off by one": "-3", "wrong sign": "2"}),
    ("decimal gold, fraction answer", mathvision_row("250", "How big is the radius $r$?\n<image1>", [], "4.8"),
     ["4.8", "\\frac{24}{5}", "24/5"], {"off by one": "5.8", "wrong sign": "-4.8", "wrong rounding": "5"}),
    ("radical fraction", mathvision_row("2796", "Find the ratio $\\frac{m}{M}$.", [],
                                                           "$\\frac{\\sqrt{6}}{6}$"),
     ["\\frac{\\sqrt{6}}{6}", "\\frac{1}{\\sqrt{6}}", "\\sqrt{6}/6"],
     {"wrong sign": "-\\frac{\\sqrt{6}}{6}", "wrong rounding": "0.4", "off by one": "\\frac{\\sqrt{6}}{5}"}),
]  # fmt: skip

LOGICVISTA = [
    ("one letter", {"question": "Which choice?", "answer": "C", "skill": ["inductive"]}, ["C", "(C)", "C) 14"],
     {"wrong option": "D"}),
    ("a list of letters", {"question": "Which belong?", "answer": "A, C", "skill": ["inductive"]},
     ["A, C", "C, A", "AC", "(A) and (C)"], {"wrong option": "A, B", "off by one": "A, B, C"}),
    ("a numbered option", {"question": "Select from 1-5", "answer": "3", "skill": ["deductive"]}, ["3"],
     {"off by one": "4", "wrong option": "C"}),
]  # fmt: skip

CHARTQA = [
    ("integer", {"question": "How many?", "answer": "14", "type": "human_test"}, ["14", "\\text{14}", "14.5"],
     {"off by one": "15", "wrong sign": "-14"}),
    ("thousands", {"question": "Value?", "answer": "1000", "type": "human_test"}, ["1000", "1,000", "1 000"],
     {"wrong sign": "-1000", "off by one": "1100"}),
    ("percent as a fraction", {"question": "Share?", "answer": "0.53", "type": "augmented_test"}, ["0.53", "53%", "0.55"],
     {"wrong sign": "-0.53", "wrong rounding": "0.6"}),
    ("a word", {"question": "Which?", "answer": "Canada", "type": "human_test"}, ["canada", "Canada"],
     {"wrong option": "United States"}),
]  # fmt: skip

LAYOUTS = [("mathverse", MATHVERSE), ("mathvista", MATHVISTA), ("mathvision", MATHVISION),
           ("logicvista", LOGICVISTA), ("chartqa", CHARTQA)]  # fmt: skip


@pytest.mark.parametrize("benchmark, cases", LAYOUTS, ids=[name for name, _ in LAYOUTS])
def test_every_gold_layout_scores_right_answers_and_only_them(benchmark, cases):
    failures = [f"{layout}: {problem}" for layout, row, right, wrong in cases
                for problem in misjudged(benchmark, row, right, list(wrong.values()))]  # fmt: skip
    assert failures == []


def test_the_layout_table_covers_every_kind_of_wrong_answer():
    kinds = {kind for _, cases in LAYOUTS for *_, wrong in cases for kind in wrong}
    assert kinds == {"off by one", "wrong sign", "wrong option", "wrong rounding"}
    assert all(sum(len(right) for _, _, right, _ in cases) >= 8 for _, cases in LAYOUTS)


# --- The fields a rule reads, the model record, deep --bench-data (refused in one line) -----------------


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    """eval.py with a hub model id (nothing is downloaded: every check here comes first)."""
    return launch(["eval.py", "--model", "nobody/no-model", *args], timeout=120)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ")
    return line


def test_rows_must_carry_the_fields_the_rule_reads(tmp_path):
    """MathVista: without `question_type` a right letter answer was scored as free-form text (wrong); without
    `precision` a float was compared at 0 decimals (1.3 == 1.4). MathVerse: without `question_type` an
    option's text no longer named its option. The file is refused, naming the row and the field."""
    float_row = {k: v for k, v in mathvista_row("1", "q", None, "1.4", "float", precision=1).items() if k != "image"}
    letter_row = {k: v for k, v in VISTA_168.items() if k != "image"}
    for row, field in [({k: v for k, v in letter_row.items() if k != "question_type"}, "question_type"),
                       ({**float_row, "precision": None}, "precision"),
                       ({k: v for k, v in float_row.items() if k != "answer_type"}, "answer_type")]:  # fmt: skip
        file = write_jsonl(tmp_path / f"no_{field}.jsonl", [letter_row, row])
        with pytest.raises(config.BadRowError, match=rf"^{file} row 1 \(id=\w+\): no '{field}'; mathvista's rule"):
            benchmarks.load_benchmark("mathvista", file, 0)
    assert benchmarks.load_benchmark("mathvista", write_jsonl(tmp_path / "ok.jsonl", [letter_row, float_row]), 0)
    assert not evaluation.score_answer("mathvista", boxed("1.3"), float_row)  # at precision 1, not 0
    assert evaluation.score_answer("mathvista", boxed("1.44"), float_row)
    bearing = {k: v for k, v in MATHVERSE_SINGULAR[0].items() if k != "question_type"}
    assert not evaluation.score_answer("mathverse", boxed("A"), bearing)  # read as free-form: 'A' is no bearing
    file = write_jsonl(tmp_path / "mathverse.jsonl", [MATHVERSE_SINGULAR[1], bearing])
    with pytest.raises(config.BadRowError, match=rf"^{file} row 1 \(id=339\): no 'question_type'; mathverse's rule"):
        benchmarks.load_benchmark("mathverse", file, 0)
    _, bad = benchmarks.prompt_rows("mathverse", [{**MATHVERSE_SINGULAR[1], "question_type": "multiple"}], 3136, 50176)
    assert bad == ["mathverse row 0 (id=340): question_type 'multiple' is neither multi-choice nor free-form"]


def test_a_broken_model_record_is_one_error_line(tmp_path):
    """An empty, cut or deeply nested model.json in an output folder: one line naming it, not a traceback."""
    chart = write_jsonl(tmp_path / "chartqa.jsonl", [{"question": "Value?", "image": "a.png", "answer": "12"}])
    record = tmp_path / "out" / "no-model" / "model.json"
    record.parent.mkdir(parents=True)
    for text in ["", '{"model": "nobody/no-mo', "[]", "[" * 100_000]:
        record.write_text(text)
        with pytest.raises(config.InputError, match=rf"^{record}: unreadable \(.*\); it names the model"):
            evaluation.output_folders(["nobody/no-model"], tmp_path / "out")
    record.write_text("")
    proc = eval_cli(
        "--benchmarks", "chartqa", "--bench-data", f"chartqa={chart}", "--output-dir", str(tmp_path / "out")
    )
    assert one_error_line(proc).startswith(f"error: {record}: unreadable (JSONDecodeError: Expecting value")
    record.write_text(json.dumps({"model": "someone/else"}))  # a readable record of another model: a new folder
    assert evaluation.output_folders(["nobody/no-model"], tmp_path / "out")["nobody/no-model"].name != "no-model"


def test_bench_data_nested_100000_deep_is_one_error_line(tmp_path):
    deep_array = tmp_path / "deep.json"
    deep_array.write_text("[" * 100_000 + "]" * 100_000)
    deep_line = tmp_path / "deep.jsonl"
    deep_line.write_text('{"question": "q", "answer": "1"}\n' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    with pytest.raises(config.BadRowError, match=rf"^{deep_array} line 1: not valid JSON \(.*nested too deeply"):
        benchmarks.load_benchmark("chartqa", str(deep_array), 0)
    with pytest.raises(config.BadRowError, match=rf"^{deep_line} line 2: not valid JSON \(nested too deeply"):
        benchmarks.load_benchmark("chartqa", str(deep_line), 0)
    proc = eval_cli("--benchmarks", "chartqa", "--bench-data", f"chartqa={deep_array}", "--output-dir",
                    str(tmp_path / "out"))  # fmt: skip
    assert one_error_line(proc).startswith(f"error: {deep_array} line 1: not valid JSON")


# --- eval.py --compare-official -------------------------------------------------------------------------


def sample(id_: str, extracted: str | None, gold: str, correct: bool, options: list[str] | None = None) -> dict:
    record = {"benchmark": "mathvista", "id": id_, "response": f"\\boxed{{{extracted}}}", "extracted": extracted,
              "gold": gold, "correct": correct, "timed_out": False, "groups": {}}  # fmt: skip
    return record if options is None else {**record, "options": options}


def test_compare_official_counts_the_verdicts_exact_match_does_not_share(tmp_path):
    """Per file: the rule's accuracy beside exact match's, and the verdicts that differ each way."""
    folder = tmp_path / "eval" / "m"
    folder.mkdir(parents=True)
    choices = ["135°", "140°", "145°"]
    write_jsonl(folder / "mathvista.jsonl", [
        sample("1", "C", "145°", True, choices),  # a letter naming the gold option: exact too
        sample("2", "145", "145°", True, choices),  # the most similar option: the rule only
        sample("3", "1,000", "1000", True, []),  # thousands separator: the rule only
        sample("4", "7", "7", True, []),  # the same text: both
        sample("5", "\\text{8}", "8", False, []),  # scored wrong here, right by exact match (a clean-up)
        sample("6", None, "3", False, []),  # no answer: neither
    ])  # fmt: skip
    write_jsonl(folder / "chartqa.jsonl", [sample("1", "24", "23", True), sample("2", "23", "23", True)])
    report = evaluation.compare_official(str(tmp_path / "eval"))
    lines = report.splitlines()
    assert lines[2] == f"| {folder / 'chartqa.jsonl'} | 2 | 100.0 | 50.0 | 1 | 0 |"
    assert lines[3] == f"| {folder / 'mathvista.jsonl'} | 6 | 66.7 | 50.0 | 2 | 1 |"
    assert f"- {folder / 'mathvista.jsonl'} id=2: answer '145', gold '145°'" in lines
    assert "(2 lines carry no `options`: a letter answer to a gold option text counts as wrong)" in lines
    assert benchmark_rules.strict_correct("(B)", "B", ["x", "y"]) and not benchmark_rules.strict_correct("B", "y", None)


def test_compare_official_refuses_what_is_no_per_sample_file(tmp_path):
    with pytest.raises(config.InputError, match="--compare-official .*nope: no such file or folder"):
        evaluation.compare_official(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(config.InputError, match="no \\*.jsonl file in this folder"):
        evaluation.compare_official(str(tmp_path / "empty"))
    bad = write_jsonl(tmp_path / "x.jsonl", [{"id": "1", "extracted": "1", "gold": "1"}])
    with pytest.raises(config.BadRowError, match=rf"^{bad} record 1: no 'correct'"):
        evaluation.compare_official(bad)
    proc = subprocess.run([sys.executable, "eval.py", "--compare-official", bad], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert one_error_line(proc) == f"error: {bad} record 1: no 'correct'; give a per-sample file of eval.py"
