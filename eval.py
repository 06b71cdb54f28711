"""Benchmark evaluation: MathVerse, MathVista, MathVision, LogicVista, ChartQA with their own rules.

    python eval.py                                        # toy: SFT and GRPO toy checkpoints on the toy test split
    python eval.py --model runs/mmr1-7b-grpo/final --benchmarks mathverse,mathvista,mathvision,logicvista,chartqa
    torchrun --nproc_per_node 8 eval.py --model M --max-new-tokens 4096
    python eval.py --model M --benchmarks mathvista --bench-data mathvista=local/mathvista.parquet --limit 50

Every answer is extracted with reward.extract_answer and scored by the benchmark's official rule
(score_answer; the rules and their sources are in docs/eval.md), with reward.is_equivalent where the
official scorer asks an LLM judge whether two values mean the same. Every row of a published file is
asked (MathVerse Vision Only rows through their `query_cot`). Writes <output-dir>/<model>/<benchmark>.jsonl
(one line per sample) and results.md / results.json: the paper's rows beside the evaluated model, and the
per-category scores each benchmark reports (BREAKDOWNS).

Departures from the official scorers (docs/eval.md):
- no LLM judge or extractor: the last \boxed{} is the answer, and equivalence is rule-based;
- the most-similar-option fallback is kept for MathVista only (its calculate_score has it; MathVerse,
  MathVision and LogicVista do not grant it);
- MathVista integers must equal the gold (calculate_score's int(float(x)) would pass 7.9 for 7);
- MathVista free-form prompts carry its `query` hint (answer type, precision) and unit; its
  multiple-choice hint is left to the Table 8 system prompt.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import reward
from data import toy
from mmr1 import chat, config, data, dist, modeling, rollout
from mmr1.config import field


@dataclass
class EvalConfig:
    """Scores a model on the five benchmarks of the paper (or the toy test split by default)."""

    model: str = field(
        "", "hub ids or local folders to evaluate, comma-separated (default: the toy SFT and GRPO checkpoints)"
    )
    benchmarks: str = field("mathverse,mathvista,mathvision,logicvista,chartqa", "comma-separated benchmark names")
    bench_data: str = field("", "local overrides, name=path[,name=path]: parquet/jsonl in the benchmark's columns")
    output_dir: str = field("runs/eval", "where per-sample jsonl files and the results table go")
    engine: str = field("auto", "generation engine: vllm (GPU), hf, or auto", choices=["auto", "hf", "vllm"])
    temperature: float = field(0.0, "sampling temperature (0 = greedy)")
    max_new_tokens: int = field(
        4096, "response token limit (the RL stage trains 4096-token responses; the toy uses 64)"
    )
    max_prompt_length: int = field(4096, "prompt token limit (vLLM context = prompt + response)")
    limit: int = field(0, "evaluate only the first N rows of each benchmark (0 = all)")
    batch_size: int = field(32, "prompts per generation call")
    min_pixels: int = field(7056, "images are resized to at least this many pixels")
    max_pixels: int = field(1048576, "images are resized to at most this many pixels")
    gpu_memory_utilization: float = field(0.75, "vLLM's share of GPU memory")
    seed: int = field(0, "sampling seed")


# Hub ids (tried in order: the first is the paper's; a later one is where the copy moved), config, split
# (PAPER.md, "Benchmark data")
HUB = {
    "mathverse": (("AI4Math/MathVerse",), "testmini", "testmini"),
    "mathvista": (("AI4Math/MathVista",), None, "testmini"),
    "mathvision": (("MathLLMs/MathVision",), None, "test"),
    "logicvista": (("lscpku/LogicVista",), None, "test"),
    "chartqa": (("lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"), None, "test"),
}

# The columns each benchmark reports its score by (its own paper / scorer); looked up in the row, then in
# its `metadata` dict (MathVerse `subject`, MathVista `task` live there)
BREAKDOWNS = {
    "mathverse": ("problem_version", "subject"),
    "mathvista": ("question_type", "task"),
    "mathvision": ("subject", "level"),
    "logicvista": ("skill",),
    "chartqa": ("type",),
    "toy": ("family",),
}

# The paper's rows, for comparison in the results table
PAPER_ROWS = {
    "Qwen2.5-VL-7B (paper)": {
        "mathverse": 50.4,
        "mathvista": 69.3,
        "mathvision": 28.7,
        "logicvista": 44.0,
        "chartqa": 82.4,
    },
    "MMR1-7B (paper)": {"mathverse": 55.4, "mathvista": 72.0, "mathvision": 31.8, "logicvista": 48.9, "chartqa": 83.7},
}
BENCHMARKS = ("mathverse", "mathvista", "mathvision", "logicvista", "chartqa", "toy")

# MathVerse "Vision Only" rows have question == "": the problem, its choices included, is drawn in the image.
# Their `query_cot` says so; this is the same instruction for a file without that column.
QUESTION_IN_IMAGE = "According to the question shown in the image, please first conduct reasoning, and then answer it."

# MathVista's answer-format hints, verbatim from its build_query.py (the text of the `query` column);
# the multiple-choice hint is left out: the Table 8 system prompt already asks for the option letter.
MATHVISTA_HINTS = {
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
    "e.g., 1, 2, 3, at the end.",
    ("float", 1): "Hint: Please answer the question requiring a floating-point number with one decimal place "
    "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("float", 2): "Hint: Please answer the question requiring a floating-point number with two decimal places "
    "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
    "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


# ---------------------------------------------------------------------------------------------
# Rows of each benchmark -> prompt rows (problem, images), and the breakdown keys
# ---------------------------------------------------------------------------------------------


def options_text(choices: list[str]) -> str:
    """'\\nChoices:\\n(A) x\\n(B) y' for a list of option texts."""
    return "\nChoices:\n" + "\n".join(f"({reward.LETTERS[i]}) {c}" for i, c in enumerate(choices))


def mathvista_hint(row: dict) -> str:
    """The answer-format hint MathVista's `query` opens with for a free-form row (integer, float with its
    precision, list); '' for multiple choice and for a row whose type has no hint."""
    if row.get("question_type") == "multi_choice":
        return ""
    kind = row.get("answer_type")
    if kind == "float" and row.get("precision") is not None:
        digits = int(float(row["precision"]))  # stored as a float, e.g. 1.0
        return MATHVISTA_HINTS.get(
            ("float", digits),
            f"Hint: Please answer the question requiring a floating-point number with {digits} decimal places "
            "and provide the final value at the end.",
        )
    return MATHVISTA_HINTS.get(kind, "")


def question_text(benchmark: str, row: dict) -> str:
    """The user-turn text of a benchmark row (the image goes before it).

    MathVerse: its `question` (the choices are in it); a Vision Only row (question == "") gets its
    `query_cot`, which tells the model the question is in the image. MathVista: hint + "Question: " +
    question + " (Unit: u)" + choices, as its `query` builds them, minus the multiple-choice hint.
    MathVision: question + its options as (A) ... lines. LogicVista, ChartQA: the question.
    """
    question = str(row.get("question") or "").strip()
    if benchmark == "mathverse" and not question:  # Vision Only: the whole problem is drawn in the image
        return str(row.get("query_cot") or "").strip() or QUESTION_IN_IMAGE
    if benchmark == "mathvista":
        if row.get("unit"):
            question += f" (Unit: {row['unit']})"
        if row.get("choices"):
            question += options_text(list(row["choices"]))
        hint = mathvista_hint(row)
        return f"{hint}\nQuestion: {question}" if hint else question
    if benchmark == "mathvision" and row.get("options"):
        question += options_text(list(row["options"]))
    return question


def to_prompt_row(benchmark: str, row: dict) -> dict:
    """The RL-format row (problem, images) the engine generates from; raises ValueError if unusable."""
    if benchmark == "toy":
        return row
    image = {"mathvista": "decoded_image", "mathvision": "decoded_image"}.get(benchmark, "image")
    image = row.get(image) if row.get(image) is not None else row.get("image")
    if image is None:
        raise ValueError("no image")
    question = question_text(benchmark, row)
    if not question or row.get("answer") in (None, ""):
        raise ValueError("missing question or answer")
    return {"problem": "<image>" + question.replace("<image>", "").strip(), "images": [image]}


def mathverse_options(question: str) -> list[str]:
    """Option texts of a MathVerse question, whose choices live in its text after "Choices:" as
    lines like "A:30°" / "(B) 40" / "C. 50", or on one line ("Choices: A. 148° B. 152°");
    [] when the question lists none (or not as consecutive letters from A)."""
    _, found, tail = (question or "").rpartition("Choices:")
    if not found:
        return []
    marks = list(re.finditer(r"(?:^|(?<=\s))\(?([A-H])\s*[:.)]\s*", tail))
    letters = [m.group(1) for m in marks]
    if len(marks) < 2 or letters != list(reward.LETTERS[: len(letters)]):
        return []
    ends = [m.start() for m in marks[1:]] + [len(tail)]
    return [tail[m.end() : end].strip() for m, end in zip(marks, ends)]


def breakdown(benchmark: str, row: dict) -> dict[str, str]:
    """{column: value} of the categories a row is reported under (BREAKDOWNS); a list value (LogicVista
    skills) is joined by ', ', a column the row lacks is left out."""
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    out = {}
    for key in BREAKDOWNS.get(benchmark, ()):
        value = row.get(key, metadata.get(key))
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        if value not in (None, ""):
            out[key] = str(value)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring rules: each benchmark's official scorer, rule by rule (sources in docs/eval.md)
# ---------------------------------------------------------------------------------------------


def tidy_math(text: str) -> str:
    """Option and gold texts as the equivalence rules read them: '√{3}' -> '\\sqrt{3}', 'π' -> '\\pi',
    LaTeX's non-breaking '~' -> ' ' ('$12 \\mathrm{~m}$' -> '12 m')."""
    return text.replace("√", "\\sqrt").replace("π", "\\pi").replace("~", " ")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def most_similar_option(pred: str, choices: list[str]) -> int | None:
    """Index of the option with the smallest Levenshtein distance to pred (both lower-cased and
    whitespace-normalised; the first on a tie); None if pred or choices are empty.

    MathVista's calculate_score.get_most_similar. Only MathVista grants this: it maps ANY answer to
    some option, the gold one about 1 time in n.
    """
    if not pred or not pred.strip() or not choices:
        return None
    p = reward.normalise_text(pred)
    distances = [levenshtein(p, reward.normalise_text(c)) for c in choices]
    return distances.index(min(distances))


def chosen_option(pred: str | None, choices: list[str], fallback: str | None = None) -> int | None:
    """The option a multiple-choice prediction names: its exact option text (case-insensitive), else
    its letter ('C', '(C)', 'C: 40°'); failing both, by `fallback`:
    - None: no option (MathVision: the value is then compared with the gold option's text);
    - 'equivalent': the first option whose text reward.is_equivalent holds equal (MathVerse's judge
      counts an option's value as that option);
    - 'similar': the most similar option (MathVista only, its official rule).
    """
    if pred is None or not choices:
        return None
    texts = [reward.normalise_text(c) for c in choices]
    if reward.normalise_text(pred) in texts:
        return texts.index(reward.normalise_text(pred))
    letter = reward.choice_letter(pred, len(choices))
    if letter is not None:
        return reward.LETTERS.index(letter)
    if fallback == "equivalent":
        return next((i for i, c in enumerate(choices) if reward.is_equivalent(tidy_math(pred), tidy_math(c))), None)
    if fallback == "similar":
        return most_similar_option(pred, choices)
    return None


def choice_labels(text: str | None) -> list[str] | None:
    """The option labels an answer names, sorted: 'A, C', 'C, A', 'AC', '(A) and (C)', 'C\\nD' ->
    ['A', 'C'] / ['C', 'D']; 'C: 14' (a letter and its option text) -> ['C']; numbered options too
    ('3' -> ['3']); None when the text is not a list of labels (a word, a decimal, a sentence)."""
    if not text or not text.strip():
        return None
    s = reward.clean_answer(text)
    if re.fullmatch(r"[A-Z]{2,8}", s):  # 'AC': letters run together
        return sorted(s)
    tokens = [t.strip("()[].:") for t in re.split(r"\s*(?:,|;|&|\band\b|\s)\s*", s) if t.strip("()[].:")]
    if not tokens or not all(re.fullmatch(r"[A-Za-z]|\d+", t) for t in tokens):
        return None
    if tokens[0].isalpha() and any(t.isdigit() for t in tokens):  # 'C: 14': a letter, then its option's text
        return [tokens[0].upper()] if sum(t.isalpha() for t in tokens) == 1 else None
    return sorted(t.upper() for t in tokens)


def final_value(text: str) -> str:
    """The value after the last '=' or '\\approx' ('x = 5' -> '5'), as MathVision's find_math_answer
    and MathVista's answer extractor take it; the text itself when it has neither."""
    return re.split(r"=|\\approx|≈", text)[-1].strip() or text


def mathvision_equal(pred: str, gold: str) -> bool:
    """MathVision's is_equal: reward.is_equivalent (on the answer or its value after '='), or both
    plain numbers equal after rounding to 2 decimals (MATH-V evaluation/utils.py rounds both to 2)."""
    pred, gold = tidy_math(pred), tidy_math(gold)
    if reward.is_equivalent(pred, gold) or reward.is_equivalent(final_value(pred), gold):
        return True
    p, g = reward.parse_number(final_value(pred)), reward.parse_number(gold)
    return p is not None and g is not None and round(p[0], 2) == round(g[0], 2)


def mathvista_number(pred: str, unit: str | None) -> float | None:
    """The number of a free-form MathVista answer, its unit dropped as MathVista's answer extractor
    drops it ('1000 g', '$18', '7 years' -> 1000, 18, 7): the value after a last '=', the row's `unit`
    before or after it, '$', and the units reward.parse_number strips; None when no number is left.
    '45%' reads as 45 (MathVista's percentages are stored as plain numbers)."""
    s = reward.clean_answer(final_value(pred)).replace("\\$", "$")
    if unit and unit.strip():
        u = re.escape(reward.clean_answer(unit))
        s = re.sub(rf"^{u}\s*|\s*{u}$", "", s, flags=re.IGNORECASE).strip()
    s = s.strip("$").strip()
    parsed = reward.parse_number(s)
    return parsed[0] if parsed is not None else None


def parse_float(text: str) -> float | None:
    """A number from text ('1,234', '12.5', '45%' -> 0.45 as ChartQA reads it), else None."""
    s = reward.clean_answer(text).replace(",", "")
    try:
        return float(s.rstrip("%")) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def chartqa_relaxed(pred: str, gold: str) -> bool:
    """ChartQA relaxed accuracy (pix2struct metrics.py relaxed_correctness, the ChartQA paper's metric):
    5% relative tolerance for a non-zero numeric target ('x%' read as x/100), else case-insensitive
    exact match (a target of 0 included). Thousands separators are dropped first ('1,000' is 1000)."""
    p, g = parse_float(pred), parse_float(gold)
    if p is not None and g is not None and g != 0:
        return abs(p - g) / abs(g) <= 0.05
    return reward.normalise_text(pred) == reward.normalise_text(gold)


def score_mathverse(pred: str, gold: str, row: dict) -> bool:
    """MathVerse (score_answer_s2.py, a GPT judge told "only when the [Model_answer] completely matches
    the [Standard Answer]", whose examples count an option's value as that option and a wrong letter
    with the right-looking text as wrong). No most-similar mapping: an answer that names no option is wrong.

    multi-choice, gold letters: the option named (letter, option text, or a value equivalent to an
    option's text, the options read from `question`, else `question_for_eval`) is the gold one; several
    gold letters ('C\\nD'): the same set of letters. Gold not a letter: equivalent to it (a letter counts
    through its option's text). free-form: reward.is_equivalent.
    """
    if row.get("question_type") != "multi-choice":
        return reward.is_equivalent(pred, gold)
    options = mathverse_options(str(row.get("question") or "")) or mathverse_options(
        str(row.get("question_for_eval") or "")
    )
    gold_labels = choice_labels(gold)
    if gold_labels and all(label.isalpha() for label in gold_labels):
        if len(gold_labels) > 1:
            return choice_labels(pred) == gold_labels
        if options:
            picked = chosen_option(pred, options, fallback="equivalent")
            return picked is not None and reward.LETTERS[picked] == gold_labels[0]
        return reward.choice_letter(pred) == gold_labels[0]  # options not in the text: only a letter can match
    if reward.is_equivalent(tidy_math(pred), tidy_math(gold)):
        return True
    picked = chosen_option(pred, options, fallback="equivalent")
    return picked is not None and reward.is_equivalent(tidy_math(options[picked]), tidy_math(gold))


def score_mathvista(pred: str, gold: str, row: dict) -> bool:
    """MathVista (calculate_score.py normalize_extracted_answer + safe_equal): multi_choice: the option
    named (its text, its letter, else the MOST SIMILAR option, the official fallback) has the gold TEXT;
    integer: the number (unit dropped) equals the gold; float: both rounded to `precision` decimals;
    list: equal without spaces; other: case-insensitive text."""
    if row.get("question_type") == "multi_choice":
        choices = list(row["choices"])
        picked = chosen_option(pred, choices, fallback="similar")
        return picked is not None and reward.normalise_text(choices[picked]) == reward.normalise_text(gold)
    kind = row.get("answer_type")
    if kind in ("integer", "float"):
        value = mathvista_number(pred, row.get("unit"))
        if value is None:
            return False
        if kind == "integer":
            return value == int(float(gold))
        digits = int(float(row.get("precision") or 0))  # stored as a float, e.g. 1.0
        return round(value, digits) == round(float(gold), digits)
    if kind == "list":
        return re.sub(r"\s", "", pred) == re.sub(r"\s", "", gold)
    return reward.normalise_text(pred) == reward.normalise_text(gold)


def score_mathvision(pred: str, gold: str, row: dict) -> bool:
    """MathVision (MATH-V evaluation/evaluate.py: correct = is_equal(gold letter, answer) or
    is_equal(gold option text, answer)): with options and a gold letter, the option named by its
    exact text or letter is the gold one, or else the answer equals the gold option's text
    (mathvision_equal); no most-similar mapping. Otherwise mathvision_equal with the gold."""
    options = list(row.get("options") or [])
    letter = gold.upper() if len(gold) == 1 and gold.isalpha() else None
    if options and letter is not None and letter in reward.LETTERS[: len(options)]:
        gold_index = reward.LETTERS.index(letter)
        picked = chosen_option(pred, options)
        return picked == gold_index if picked is not None else mathvision_equal(pred, options[gold_index])
    return mathvision_equal(pred, gold)


def score_logicvista(pred: str, gold: str) -> bool:
    """LogicVista (eval/extract_accuracy_new.py: the gold split on ', ', lower-cased and sorted, equals the
    sorted letters or numbers the answer chose): the same sorted labels ('C, A' == 'A, C'; '3' for a
    numbered option); one gold label also matches an answer naming that letter ('C: 14'). A gold that is
    no label list is compared by reward.is_equivalent."""
    gold_labels = choice_labels(gold)
    if gold_labels is None:
        return reward.is_equivalent(pred, gold)
    pred_labels = choice_labels(pred)
    if pred_labels is None and len(gold_labels) == 1:
        letter = reward.choice_letter(pred)
        pred_labels = [letter] if letter is not None else None
    return pred_labels == gold_labels


def score_answer(benchmark: str, response: str, row: dict) -> bool:
    """Whether `response` answers `row` (in the benchmark's own column layout) correctly, by the
    benchmark's official rule (docs/eval.md has the table and the sources).

    benchmark: mathverse, mathvista, mathvision, logicvista, chartqa or toy.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {BENCHMARKS}")
    pred = reward.extract_answer(response)
    gold = str(row["answer"]).strip()
    if pred is None or not pred.strip():
        return False
    if benchmark == "toy":
        return reward.is_equivalent(pred, gold, row.get("choices"))
    if benchmark == "mathverse":
        return score_mathverse(pred, gold, row)
    if benchmark == "mathvista":
        return score_mathvista(pred, gold, row)
    if benchmark == "mathvision":
        return score_mathvision(pred, gold, row)
    if benchmark == "logicvista":
        return score_logicvista(pred, gold)
    return chartqa_relaxed(pred, gold)  # ChartQA (pix2struct relaxed_correctness)


# ---------------------------------------------------------------------------------------------
# Loading and generation
# ---------------------------------------------------------------------------------------------


def load_benchmark(name: str, override: str | None, limit: int) -> list[dict]:
    """Raw rows of a benchmark: a local parquet/jsonl override, or its hub ids (HUB) tried in order,
    each failure said in one line; SystemExit naming every id tried when none loads."""
    import datasets

    if override:
        fmt = "parquet" if override.endswith(".parquet") else "json"
        ds = datasets.load_dataset(fmt, data_files=override, split="train")
    elif name == "toy":
        ds = datasets.load_dataset("parquet", data_files=str(toy.TOY_DATA_DIR / "rl" / "test.parquet"), split="train")
    else:
        hub_ids, subset, split = HUB[name]
        ds, failures = None, []
        for hub_id in hub_ids:
            try:
                ds = datasets.load_dataset(hub_id, subset, split=split)
                break
            except Exception as e:  # noqa: BLE001 - any failure to resolve or read: try the next copy
                failures.append(f"{hub_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                more = f"; trying {hub_ids[len(failures)]}" if len(failures) < len(hub_ids) else ""
                print(f"[eval] {name}: could not load {hub_id} ({type(e).__name__}){more}")
        if ds is None:
            raise SystemExit(
                f"could not load {name} from the hub ({'; '.join(failures)}); "
                f"download it and pass --bench-data {name}=<file.parquet>"
            )
    rows = [dict(r) for r in ds]
    return rows[:limit] if limit else rows


def evaluate_benchmark(engine, name: str, raw: list[dict], cfg: EvalConfig, d: dist.Dist):
    """Generates for every usable row (sharded over ranks), scores it; returns (records, bad).

    Benchmarks are asked as the paper does: the Table 8 prompt as the system message, the question
    (with its options) in the user turn. The toy is asked in its own format (no system prompt).
    """
    usable, bad = [], []
    for i, row in enumerate(raw):
        row_id = str(row.get("id", row.get("pid", row.get("sample_index", i))))
        try:
            prompt = to_prompt_row(name, row)
            data.check_row({**prompt, "answer": str(row.get("answer"))}, "rl", cfg.min_pixels, cfg.max_pixels)
            usable.append((row_id, row, prompt))
        except (ValueError, TypeError, KeyError) as e:
            bad.append(f"{name} row {i} (id={row_id}): {e}")
    padded, n_real = dist.shard(usable, d)
    engine.prompt_format = chat.PromptFormat(system="" if name == "toy" else chat.EVAL_SYSTEM_PROMPT)
    records = []
    sampling = rollout.Sampling(cfg.temperature, 1.0, cfg.max_new_tokens, dist.derive_seed(cfg.seed, "eval"))
    bar = tqdm(total=len(usable), disable=not d.master, desc=name, leave=False)
    for s in range(0, len(padded), cfg.batch_size):
        part = padded[s : s + cfg.batch_size]
        outs = engine.generate([p for _, _, p in part], 1, sampling)
        for (row_id, row, _), out in zip(part, outs):
            correct = score_answer(name, out.text, row)
            records.append(
                {
                    "benchmark": name,
                    "id": row_id,
                    "response": out.text,
                    "extracted": reward.extract_answer(out.text),
                    "gold": str(row["answer"]),
                    "correct": bool(correct),
                    "groups": breakdown(name, row),
                }
            )
        bar.update(len(part) * d.world_size)
    bar.close()
    records = dist.all_gather_list(records[:n_real], d)
    return records, bad


def summarise(records: list[dict]) -> dict:
    """{'accuracy': %, 'n': rows, 'breakdown': {column: {value: {'accuracy': %, 'n': rows}}}} of one
    benchmark's records (the columns of BREAKDOWNS its rows have)."""
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    by: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        for column, value in r.get("groups", {}).items():
            by.setdefault(column, {}).setdefault(value, []).append(r["correct"])
    return {
        "accuracy": pct([r["correct"] for r in records]),
        "n": len(records),
        "breakdown": {
            column: {v: {"accuracy": pct(xs), "n": len(xs)} for v, xs in sorted(values.items())}
            for column, values in by.items()
        },
    }


def results_table(results: dict[str, dict[str, dict]], names: list[str], with_paper: bool) -> str:
    """Markdown table: one row per evaluated model (plus the paper's rows), one column per benchmark."""
    header = "| model | " + " | ".join(names) + (" | avg |" if len(names) > 1 else " |")
    lines = [header, "|" + " --- |" * (len(names) + 1 + (len(names) > 1))]
    rows = {m: {b: r[b]["accuracy"] for b in names if b in r} for m, r in results.items()}
    if with_paper:
        rows.update({m: v for m, v in PAPER_ROWS.items()})
    for model, scores in rows.items():
        cells = [f"{scores[b]:.1f}" if b in scores else "-" for b in names]
        avg = [f"{sum(scores[b] for b in names) / len(names):.1f}" if all(b in scores for b in names) else "-"]
        lines.append(f"| {model} | " + " | ".join(cells + (avg if len(names) > 1 else [])) + " |")
    return "\n".join(lines)


def breakdown_tables(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    """Markdown tables of the per-category scores: one per benchmark and breakdown column, one row per
    model, one column per category (its row count in the header)."""
    blocks = []
    for name in names:
        columns = {c: v for r in results.values() if name in r for c, v in r[name].get("breakdown", {}).items()}
        for column, values in columns.items():
            header = "| model | " + " | ".join(f"{v} (n={s['n']})" for v, s in values.items()) + " |"
            lines = [f"{name} by {column}:", "", header, "|" + " --- |" * (len(values) + 1)]
            for model, r in results.items():
                scores = r.get(name, {}).get("breakdown", {}).get(column, {})
                cells = [f"{scores[v]['accuracy']:.1f}" if v in scores else "-" for v in values]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run_name(model: str) -> str:
    """The folder a model's per-sample files go to: its folder name, or its run's for a checkpoint
    folder (runs/x/final -> x, runs/x/step-100 -> x-step-100)."""
    path = Path(model)
    if path.name == "final":
        return path.parent.name
    return f"{path.parent.name}-{path.name}" if path.name.startswith("step-") else path.name


def main() -> None:
    cfg = config.parse_config(EvalConfig)
    d = dist.setup_distributed(cfg.seed)
    if cfg.model:
        models = {m: m for m in cfg.model.split(",") if m}
        names = [b.strip() for b in cfg.benchmarks.split(",") if b.strip()]
    else:  # toy: compare the SFT and GRPO toy checkpoints on the toy test split
        toy.ensure_toy()
        runs = toy.ROOT / "runs"
        models = {n: str(runs / n / "final") for n in ("toy-sft", "toy-grpo") if (runs / n / "final").exists()}
        if not models:
            raise SystemExit("no toy checkpoints: run `python sft.py` (and `python grpo.py --vas`) first")
        names, cfg.max_new_tokens, cfg.min_pixels, cfg.max_pixels = ["toy"], min(cfg.max_new_tokens, 64), 3136, 50176
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    overrides = dict(kv.split("=", 1) for kv in cfg.bench_data.split(",") if kv)
    raw = {n: load_benchmark(n, overrides.get(n), cfg.limit) for n in names}

    results: dict[str, dict[str, dict]] = {}
    for label, path in models.items():
        processor = modeling.load_processor(path, cfg.min_pixels, cfg.max_pixels)
        model = None
        if cfg.engine != "vllm":
            model = modeling.shard_model(modeling.load_model(path, d.device), d).eval()
        engine = rollout.make_engine(
            cfg.engine,
            model,
            processor,
            d,
            model_path=path,
            min_pixels=cfg.min_pixels,
            max_pixels=cfg.max_pixels,
            batch_size=cfg.batch_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_new_tokens + cfg.max_prompt_length,
        )
        out_dir = Path(cfg.output_dir) / run_name(label)
        results[label] = {}
        for name in names:
            records, bad = evaluate_benchmark(engine, name, raw[name], cfg, d)
            if d.master:
                out_dir.mkdir(parents=True, exist_ok=True)
                with (out_dir / f"{name}.jsonl").open("w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                for line in bad:
                    print(f"[eval] skipped malformed {line}")
                results[label][name] = {**summarise(records), "skipped": len(bad)}
                s = results[label][name]
                groups = "; ".join(
                    f"{column}: " + ", ".join(f"{v} {g['accuracy']:.1f}" for v, g in values.items())
                    for column, values in s["breakdown"].items()
                )
                print(f"[eval] {label} {name}: {s['accuracy']:.1f}% of {s['n']} ({groups}); {len(bad)} skipped")
        engine.close()  # frees vLLM before the next model's engine starts
        del model, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if d.master:
        table = results_table(results, names, with_paper="toy" not in names)
        table += "\n\n" + breakdown_tables(results, names)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "results.md").write_text(table + "\n")
        (Path(cfg.output_dir) / "results.json").write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2)
        )
        print(table)
    dist.cleanup_distributed()


if __name__ == "__main__":
    main()
