"""eval.py's scoring rules on rows copied in each benchmark's published column layout.

Rows are real benchmark rows (MathVista testmini pids 1, 2, 3, 6, 10, 44; MathVision testmini ids 4, 39,
55, 59, 91; MathVerse examples from its own scorer prompts and output template; LogicVista v1_0, v1_1,
v1_4, v1_19, v1_20), images left out. For every multiple-choice row: the gold letter and the gold option's
text score 1, free-form answers that are no option score 0 (MathVision, MathVerse: no most-similar mapping).
"""

import datasets
import pytest

import eval as evaluation
from mmr1 import benchmark_rules, benchmarks


def boxed(answer: str) -> str:
    return f"<think>working</think><answer>\\boxed{{{answer}}}</answer>"


def score(benchmark: str, pred: str, row: dict) -> bool:
    return evaluation.score_answer(benchmark, boxed(pred), row)


# Free-form answers that are none of the options of any multiple-choice row below
NOT_AN_OPTION = ["7.5", "-4", "\\frac{2}{3}", "x^2+1", "banana", "1000", "2\\pi"]

# --- MathVerse (AI4Math/MathVerse testmini) -----------------------------------------------------------

MV_TEXT = (
    "As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()\n"
    "Choices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}"
)


def mathverse_row(version: str, question: str, **extra) -> dict:
    mc = extra.pop("question_type", "multi-choice") == "multi-choice"
    instruction = "the correct option letter, e.g., A, B, C, D" if mc else "the final value, e.g., 1, 2.5, 300"
    prefix = "According to the question shown in the image, " if version == "Vision Only" else ""
    return {
        "sample_index": extra.pop("sample_index", "1"),
        "problem_index": "1",
        "problem_version": version,
        "question": question,
        "image": None,
        "answer": extra.pop("answer", "C"),
        "question_type": "multi-choice" if mc else "free-form",
        "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Length"},
        "query_wo": f"{prefix}Please directly answer the question and provide {instruction}."
        + (f"\nQuestion: {question}" if question else ""),
        "query_cot": f"{prefix}please first conduct reasoning, and then answer the question and provide "
        f"{instruction}, at the end." + (f"\nQuestion: {question}" if question else ""),
        "question_for_eval": extra.pop("question_for_eval", MV_TEXT),
        **extra,
    }


MATHVERSE_MC = [
    mathverse_row("Text Dominant", MV_TEXT),
    mathverse_row("Vision Intensive", "Circle O has a radius 1.0, find BC.\nChoices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}"),
    mathverse_row("Vision Only", ""),  # options only in question_for_eval (and the image)
]
MATHVERSE_FREE = [
    mathverse_row("Text Lite", "The radius is 3 cm. Find L.\n\nGive your answer rounded down to the nearest cm.",
                  question_type="free-form", answer="14", question_for_eval="Find L."),
    mathverse_row("Vision Only", "", question_type="free-form", answer="14", question_for_eval="Find L."),
]  # fmt: skip


@pytest.mark.parametrize("row", MATHVERSE_MC, ids=lambda r: r["problem_version"])
def test_mathverse_multiple_choice(row):
    for right in ["C", "(C)", "C: √{3}", "√{3}", "\\sqrt{3}"]:
        assert score("mathverse", right, row), right
    for wrong in ["B", "A", "B:2√{3}", "2\\sqrt{3}", "2", *NOT_AN_OPTION]:  # 2: option A's text, not C's
        assert not score("mathverse", wrong, row), wrong


def test_mathverse_without_readable_options_only_the_letter_counts():
    row = mathverse_row("Vision Only", "", question_for_eval="")
    assert score("mathverse", "C", row) and score("mathverse", "(C)", row)
    for wrong in ["B", "√{3}", *NOT_AN_OPTION]:  # the options are in the image only: a value names none
        assert not score("mathverse", wrong, row), wrong


def test_mathverse_gold_that_is_no_letter_is_never_matched_by_nothing():
    """The old rule compared choice_letter(pred) == choice_letter(gold): None == None, any answer right."""
    row = mathverse_row("Text Only", "Find the domain of f.", answer="(-2,1]", question_for_eval="")
    assert score("mathverse", "(-2,1]", row)
    for wrong in ["banana", "(-2,1)", "A", *NOT_AN_OPTION]:
        assert not score("mathverse", wrong, row), wrong
    lettered = mathverse_row("Text Dominant", MV_TEXT, answer="√{3}")  # gold as option text: its letter counts
    assert score("mathverse", "C", lettered) and score("mathverse", "\\sqrt{3}", lettered)
    assert not score("mathverse", "B", lettered) and not score("mathverse", "banana", lettered)


def test_mathverse_several_gold_letters_and_free_form():
    row = mathverse_row("Text Dominant", MV_TEXT, answer="C\nD")
    assert score("mathverse", "C, D", row) and score("mathverse", "D, C", row)
    assert not score("mathverse", "A and C", row) and not score("mathverse", "C", row)
    for row in MATHVERSE_FREE:
        assert score("mathverse", "14", row) and score("mathverse", "14 cm", row)
        assert not score("mathverse", "13", row) and not score("mathverse", "banana", row)


def test_mathverse_vision_only_prompt_says_the_question_is_in_the_image():
    row = mathverse_row("Vision Only", "")
    text = benchmarks.mathverse_question(row)
    assert text == row["query_cot"] and text.startswith("According to the question shown in the image")
    assert benchmarks.to_prompt_row("mathverse", {**row, "image": "png"})["problem"] == "<image>" + text
    bare = {k: v for k, v in row.items() if k not in ("query_cot", "query_wo")}
    assert benchmarks.mathverse_question(bare) == benchmarks.QUESTION_IN_IMAGE
    assert benchmarks.mathverse_question(MATHVERSE_MC[0]) == MV_TEXT  # other versions: the question
    assert benchmarks.breakdown("mathverse", row) == {"problem_version": "Vision Only", "subject": "Plane Geometry"}


def test_mathverse_options_inline_and_in_lines():
    assert benchmark_rules.mathverse_options(MV_TEXT) == ["2", "2√{3}", "√{3}", "2√{2}"]
    inline = "Based on the image, what is y?\nChoices: A. 148^\\circ B. 152^\\circ C. 180^\\circ D. 32^\\circ"
    assert benchmark_rules.mathverse_options(inline) == ["148^\\circ", "152^\\circ", "180^\\circ", "32^\\circ"]
    assert benchmark_rules.mathverse_options("Find point A. Then B: 3") == []  # no "Choices:"
    assert benchmark_rules.mathverse_options("Choices:\nB:1\nC:2") == []  # not from A


# --- MathVista (AI4Math/MathVista testmini) -----------------------------------------------------------


def mathvista_row(pid, question, choices, unit, precision, answer, question_type, answer_type, query) -> dict:
    return {
        "pid": pid,
        "question": question,
        "image": f"images/{pid}.jpg",
        "decoded_image": None,
        "choices": choices,
        "unit": unit,
        "precision": precision,
        "answer": answer,
        "question_type": question_type,
        "answer_type": answer_type,
        "metadata": {"split": "testmini", "language": "english", "task": "math word problem"},
        "query": query,
    }


INT_HINT = benchmarks.MATHVISTA_HINTS["integer"]
MC_HINT = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
VISTA_2 = mathvista_row(
    "2",
    "what is the total volume of the measuring cup?",
    None,
    "g",
    None,
    "1000",
    "free_form",
    "integer",
    f"{INT_HINT}\nQuestion: what is the total volume of the measuring cup? (Unit: g)",
)
VISTA_44 = mathvista_row(
    "44",
    "Chase wants to buy 4 kilograms of oval beads and 5 kilograms of star-shaped beads. How much will he spend?",
    None,
    "$",
    None,
    "18",
    "free_form",
    "integer",
    "",
)
VISTA_1 = mathvista_row(
    "1",
    "By what distance $d$ is the spring compressed?",
    None,
    None,
    1.0,
    "1.2",
    "free_form",
    "float",
    benchmarks.MATHVISTA_HINTS[("float", 1)] + "\nQuestion: By what distance $d$ is the spring compressed?",
)
VISTA_3 = mathvista_row(
    "3",
    "△ABC的两内角平分线OB、OC相交于点O，若∠A＝110°，则∠BOC＝（）",
    ["135°", "140°", "145°", "150°"],
    None,
    None,
    "145°",
    "multi_choice",
    "text",
    "",
)
VISTA_6 = mathvista_row(
    "6",
    "As shown in the figure, if CB = 4.0, DB = 7.0, and D is the midpoint of AC, then the length of AC is ()",
    ["6cm", "7cm", "4cm", "5cm"],
    None,
    None,
    "6cm",
    "multi_choice",
    "text",
    "",
)
VISTA_10 = mathvista_row("10", "Which object comes next?", ["A", "B", "C", "D", "E"], None, None, "E", "multi_choice",
                         "text", "")  # fmt: skip


def test_mathvista_unit_rows_accept_the_unit():
    for right in ["1000", "1000 g", "1000g", "1,000 \\text{g}", "1000.0", "V = 1000 g"]:
        assert score("mathvista", right, VISTA_2), right
    for wrong in ["999 g", "1000 kg", "1 kg", "100", "banana"]:
        assert not score("mathvista", wrong, VISTA_2), wrong
    for right in ["18", "\\$18", "$18", "18 dollars", "18.0"]:
        assert score("mathvista", right, VISTA_44), right
    assert not score("mathvista", "19", VISTA_44) and not score("mathvista", "$17", VISTA_44)


def test_mathvista_precision_and_the_prompt_hint():
    assert (
        score("mathvista", "1.2", VISTA_1)
        and score("mathvista", "1.23", VISTA_1)
        and score("mathvista", "d = 1.2", VISTA_1)
    )
    assert not score("mathvista", "1.3", VISTA_1) and not score("mathvista", "12", VISTA_1)
    # the free-form prompt is the benchmark's own query; multiple choice keeps the Table 8 letter instruction only
    assert benchmarks.mathvista_question(VISTA_2) == VISTA_2["query"]
    assert benchmarks.mathvista_question(VISTA_1) == VISTA_1["query"]
    assert (
        benchmarks.mathvista_question(VISTA_3)
        == VISTA_3["question"] + "\nChoices:\n(A) 135°\n(B) 140°\n(C) 145°\n(D) 150°"
    )
    assert MC_HINT not in benchmarks.mathvista_question(VISTA_3)
    assert benchmarks.mathvista_hint(
        {"question_type": "free_form", "answer_type": "float", "precision": 2.0}
    ).startswith("Hint: Please answer the question requiring a floating-point number with two decimal places")
    assert benchmarks.breakdown("mathvista", VISTA_2) == {"question_type": "free_form", "task": "math word problem"}  # fmt: skip


@pytest.mark.parametrize("row", [VISTA_3, VISTA_6, VISTA_10], ids=lambda r: r["pid"])
def test_mathvista_multiple_choice_gold_letter_and_text(row):
    gold = row["choices"].index(row["answer"])
    assert score("mathvista", "ABCDE"[gold], row) and score("mathvista", f"({'ABCDE'[gold]})", row)
    assert score("mathvista", row["answer"], row)
    for other in range(len(row["choices"])):
        if other != gold:
            assert not score("mathvista", "ABCDE"[other], row) and not score("mathvista", row["choices"][other], row)


def test_mathvista_keeps_its_most_similar_option_rule():
    """MathVista's calculate_score maps an answer that names no option to the most similar one (Levenshtein)."""
    assert score("mathvista", "145", VISTA_3) and score("mathvista", "1450", VISTA_3)  # nearest: 145°
    assert not score("mathvista", "136°", VISTA_3)  # nearest: 135°
    assert not score("mathvista", "144°", VISTA_3)  # 140° and 145° tie: the first wins, as in MathVista
    assert score("mathvista", "6 cm", VISTA_6) and not score("mathvista", "5 cm", VISTA_6)
    assert benchmark_rules.most_similar_option("larger one", ["smaller", "larger"]) == 1
    assert (
        benchmark_rules.most_similar_option("", ["x"]) is None and benchmark_rules.levenshtein("kitten", "sitting") == 3
    )


# --- MathVision (MathLLMs/MathVision) -----------------------------------------------------------------


def mathvision_row(id_, question, options, answer, level, subject) -> dict:
    return {"id": id_, "question": question, "options": options, "image": f"images/{id_}.jpg", "decoded_image": None,
            "answer": answer, "solution": None, "level": level, "subject": subject}  # fmt: skip


MATHVISION_MC = [
    mathvision_row("39", "Ingrid has 4 red, 3 blue, 2 green and 1 yellow cube. ... Which colour is the cube with the "
                   "question mark?", ["red", "blue", "green", "Yellow", "This cannot be worked out for certain."], "A",
                   3, "logic"),
    mathvision_row("55", "Which word is formed while Gerda walks from point 1 to point 2?\n<image1>",
                   ["KNAO", "KNGO", "KNR", "AGRO", "KAO"], "A", 1, "combinatorics"),
    mathvision_row("91", "The floor of a room is covered with equally big rectangular tiles (see picture). How long is "
                   "the room? <image1>", ["$6 \\mathrm{~m}$", "$8 \\mathrm{~m}$", "$10 \\mathrm{~m}$",
                   "$11 \\mathrm{~m}$", "$12 \\mathrm{~m}$"], "E", 1, "combinatorial geometry"),
    mathvision_row("27", "In which order will she go past the shapes?\n<image1>", ["$\\Delta, \\square, \\bullet$",
                   "$\\Delta, \\bullet, \\square$", "$\\bullet, \\Delta, \\square$", "$\\square, \\Delta, \\bullet$",
                   "$\\square, \\bullet, \\Delta$"], "A", 5, "topology"),
    mathvision_row("6", "In which picture can we see the kittens of Misty?\n<image1>", ["A", "B", "C", "D", "E"], "D",
                   3, "logic"),
]  # fmt: skip


@pytest.mark.parametrize("row", MATHVISION_MC, ids=lambda r: r["id"])
def test_mathvision_multiple_choice(row):
    gold = "ABCDE".index(row["answer"])
    assert score("mathvision", row["answer"], row) and score("mathvision", f"({row['answer']})", row)
    assert score("mathvision", row["answer"].lower(), row)  # MATH-V lower-cases both sides
    assert score("mathvision", row["options"][gold], row)
    for other in range(5):
        if other != gold:
            assert not score("mathvision", "ABCDE"[other], row)
            assert not score("mathvision", row["options"][other], row) or row["options"][other] == "ABCDE"[gold]
    for wrong in NOT_AN_OPTION:
        assert not score("mathvision", wrong, row), wrong


def test_mathvision_values_units_and_free_form():
    room = MATHVISION_MC[2]
    for right in ["12", "12 m", "12\\text{ m}", "x = 12"]:
        assert score("mathvision", right, room), right
    assert not score("mathvision", "11.9", room) and not score("mathvision", "9", room)
    digits = mathvision_row(
        "4", "How many different digits can you find in this picture?\n<image1>", [], "6", 1, "counting"
    )
    assert score("mathvision", "6", digits) and not score("mathvision", "7", digits)
    letter_gold = mathvision_row("59", "Which side is opposite to <image3>?\n<image4>", [], "C", 1, "solid geometry")
    assert score("mathvision", "C", letter_gold) and not score("mathvision", "B", letter_gold)
    assert not score("mathvision", "banana", letter_gold)
    third = mathvision_row("x", "What fraction is shaded?", [], "\\frac{1}{3}", 2, "arithmetic")
    assert score("mathvision", "0.33", third)  # MATH-V compares numbers rounded to 2 decimals
    assert not score("mathvision", "0.3", third) and not score("mathvision", "0.34", third)
    assert benchmarks.breakdown("mathvision", digits) == {"subject": "counting", "level": "1"}
    assert benchmarks.mathvision_question(MATHVISION_MC[1]).endswith("\nChoices:\n(A) KNAO\n(B) KNGO\n(C) KNR\n(D) AGRO\n(E) KAO")  # fmt: skip


# --- LogicVista (lscpku/LogicVista) ---------------------------------------------------------------------


def logicvista_row(id_, question, answer, skill) -> dict:
    return {"question": question, "answer": answer, "reasoning": "...", "image": None, "skill": skill,
            "broad_capability": ["diagram"], "specific_capability": [], "imagesource": "aptitudetests",
            "sourcelink": "https://www.aptitudetests.org/logical-reasoning-test/", "liscenced": True, "id": id_}  # fmt: skip


def test_logicvista_labels():
    one = logicvista_row(
        "v1_0", "What choice (A, B, C, or D) should be in place of the question mark?", "C", ["inductive"]
    )
    two = logicvista_row(
        "v1_1", "Which choices in the image (A-D) belong to the green category?", "A, C", ["inductive"]
    )
    nine = logicvista_row("v1_4", "Who is the odd-one-out? Select answers from A-I", "G", ["inductive"])
    numbered = logicvista_row(
        "v1_20", "Which is the correct answer according to the image? Select from 1-5", "3", ["deductive"]
    )
    inline = logicvista_row("v1_19", "How many triangles will be in the 6th shape? Select answers from A-D. \n A) 10 B) 12 "
                            "C) 14 D) 16", "C", ["inductive"])  # fmt: skip
    assert score("logicvista", "C", one) and score("logicvista", "(C)", one) and not score("logicvista", "D", one)
    for right in ["A, C", "C, A", "AC", "(A) and (C)"]:
        assert score("logicvista", right, two), right
    for wrong in ["A", "A, B, C", "C", "banana"]:
        assert not score("logicvista", wrong, two), wrong
    assert score("logicvista", "G", nine) and not score("logicvista", "F", nine)  # letters past E
    assert score("logicvista", "3", numbered) and not score("logicvista", "4", numbered)
    assert not score("logicvista", "C", numbered)
    assert score("logicvista", "C", inline) and score("logicvista", "C) 14", inline)
    for wrong in ["14", "12", "B) 12", "7.5", "C and D"]:
        assert not score("logicvista", wrong, inline), wrong
    assert benchmarks.breakdown("logicvista", numbered) == {"skill": "deductive"}
    assert benchmark_rules.choice_labels("C\nD") == ["C", "D"] and benchmark_rules.choice_labels("I think") is None


# --- ChartQA (lmms-lab/ChartQA) and loading --------------------------------------------------------------


def test_chartqa_rows_and_breakdown():
    human = {
        "type": "human_test",
        "question": "How many food item is shown in the bar graph?",
        "answer": "14",
        "image": None,
    }
    augmented = {"type": "augmented_test", "question": "What is the value of Japan?", "answer": "0.53", "image": None}
    assert score("chartqa", "14", human) and not score("chartqa", "15", human)
    assert (
        score("chartqa", "53%", augmented)
        and score("chartqa", "0.55", augmented)
        and not score("chartqa", "0.6", augmented)
    )
    assert benchmarks.breakdown("chartqa", human) == {"type": "human_test"}


def test_hub_fallback_tries_the_next_id(monkeypatch, capsys):
    tried = []

    def load(hub_id, config=None, split=None):
        tried.append(hub_id)
        if hub_id == "lmms-lab/ChartQA":
            raise FileNotFoundError("Dataset 'lmms-lab/ChartQA' doesn't exist on the Hub")
        return datasets.Dataset.from_list([{"type": "human_test", "question": "q", "answer": "1", "image": None}])

    monkeypatch.setattr(datasets, "load_dataset", load)
    rows = benchmarks.load_benchmark("chartqa", None, 0)
    assert tried == ["lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"] and rows[0]["answer"] == "1"
    assert (
        "could not load lmms-lab/ChartQA (FileNotFoundError); trying lmms-lab-encoder/ChartQA"
        in capsys.readouterr().out
    )

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(
        benchmarks.InputError, match="lmms-lab-encoder/ChartQA: ConnectionError: offline.*--bench-data chartqa="
    ):
        benchmarks.load_benchmark("chartqa", None, 0)


def test_summaries_and_breakdown_tables():
    records = [
        {"correct": True, "groups": {"problem_version": "Vision Only", "subject": "Plane Geometry"}},
        {"correct": False, "groups": {"problem_version": "Vision Only", "subject": "Functions"}},
        {"correct": True, "groups": {"problem_version": "Text Lite", "subject": "Functions"}},
    ]
    s = evaluation.summarise(records)
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(200 / 3)
    assert s["breakdown"]["problem_version"] == {"Text Lite": {"accuracy": 100.0, "n": 1},
                                                 "Vision Only": {"accuracy": 50.0, "n": 2}}  # fmt: skip
    assert s["breakdown"]["subject"]["Functions"] == {"accuracy": 50.0, "n": 2}
    tables = evaluation.breakdown_tables({"m": {"mathverse": s}}, ["mathverse"])
    assert "mathverse by problem_version:" in tables
    assert "| model | Text Lite (n=1) | Vision Only (n=2) |\n| --- | --- | --- |\n| m | 100.0 | 50.0 |" in tables
