"""The five benchmarks of the paper: where each lives, how its rows become prompts, and how an
answer is scored by the rule of the benchmark's own official scorer (sources cited per rule).

`score_answer(benchmark, response, row)` is the one scoring entry point (eval.py re-exports it);
grpo.py uses the same rules for validation on a benchmark file (`--val-benchmark`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import reward

from .chat import EVAL_SYSTEM_PROMPT
from .config import BadRowError, InputError, MissingDataError, first_line
from .data import check_row

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
    """The user-turn text of a benchmark row (the image goes before it): the registry's `question`
    rule of the benchmark (BENCHMARKS)."""
    return BENCHMARKS[benchmark].question(row)


def plain_question(row: dict) -> str:
    """LogicVista, ChartQA: the `question` as it is."""
    return str(row.get("question") or "").strip()


def mathverse_question(row: dict) -> str:
    """MathVerse: its `question` (the choices are in it); a Vision Only row (question == "") gets its
    `query_cot`, which tells the model the question is in the image."""
    return plain_question(row) or str(row.get("query_cot") or "").strip() or QUESTION_IN_IMAGE


def mathvista_question(row: dict) -> str:
    """MathVista: hint + "Question: " + question + " (Unit: u)" + choices, as its `query` builds them,
    minus the multiple-choice hint."""
    question = plain_question(row)
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    if row.get("choices"):
        question += options_text(list(row["choices"]))
    hint = mathvista_hint(row)
    return f"{hint}\nQuestion: {question}" if hint else question


def mathvision_question(row: dict) -> str:
    """MathVision: the question, then its options as (A) ... lines."""
    question = plain_question(row)
    return question + options_text(list(row["options"])) if row.get("options") else question


def to_prompt_row(benchmark: str, row: dict) -> dict:
    """The RL-format row (problem, images) the engine generates from; raises ValueError if unusable:
    no image, no question or answer, or a field the benchmark's scoring rule reads in a form it
    cannot read (the registry's `check`). A toy row is already in the RL layout."""
    spec = BENCHMARKS[benchmark]
    problem = spec.check(row)
    if problem:
        raise ValueError(problem)
    if spec.question is None:
        return row
    image = next((row[c] for c in spec.image_columns if row.get(c) is not None), None)
    if image is None:
        raise ValueError("no image")
    question = spec.question(row)
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


def mathvista_text(pred: str, unit: str | None) -> str:
    """The text of a free-form MathVista answer's number, its unit dropped as MathVista's answer extractor
    drops it: the value after a last '=', the row's `unit` before or after it, '$' (linear time: plain
    prefix / suffix tests, no pattern over the whitespace)."""
    s = reward.clean_answer(final_value(pred)).replace("\\$", "$").strip()
    if unit and unit.strip():
        u = reward.clean_answer(unit).lower()
        if u and s.lower().startswith(u):
            s = s[len(u) :].strip()
        if u and s.lower().endswith(u):
            s = s[: len(s) - len(u)].strip()
    return s.strip("$").strip()


def mathvista_number(pred: str, unit: str | None) -> float | None:
    """The number of a free-form MathVista answer ('1000 g', '$18', '7 years' -> 1000, 18, 7): mathvista_text
    read by reward.parse_number (which strips its own units too); None when no number is left.
    '45%' reads as 45 (MathVista's percentages are stored as plain numbers)."""
    parsed = reward.parse_number(mathvista_text(pred, unit))
    return parsed[0] if parsed is not None else None


def parse_float(text: str) -> float | None:
    """A number from text ('1,234', '1 234' with any space kind between groups of three digits, '12.5',
    '45%' -> 0.45 as ChartQA reads it), else None."""
    s = reward.clean_answer(text)
    s = (s.replace(" ", "") if _SPACE_THOUSANDS.fullmatch(s) else s).replace(",", "")
    try:
        return float(s.rstrip("%")) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


_SPACE_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d*)?%?")  # '1 000' (NBSP etc. are ' ' after NFKC)


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
    integer: the number (unit dropped) equals the gold exactly; float: both rounded to `precision` decimals;
    list: equal without spaces; other: case-insensitive text."""
    if row.get("question_type") == "multi_choice":
        choices = list(row["choices"])
        picked = chosen_option(pred, choices, fallback="similar")
        return picked is not None and reward.normalise_text(choices[picked]) == reward.normalise_text(gold)
    kind = row.get("answer_type")
    if kind in ("integer", "float"):
        if kind == "integer":  # exact, also beyond float precision (123456788 is not 123456789)
            value, target = reward.exact_number(mathvista_text(pred, row.get("unit"))), reward.exact_number(gold)
            return value is not None and value == (target if target is not None else int(float(gold)))
        value = mathvista_number(pred, row.get("unit"))
        if value is None:
            return False
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
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {list(BENCHMARKS)}")
    pred = reward.extract_answer(response)
    gold = str(row["answer"]).strip()
    if pred is None or not pred.strip():
        return False
    return BENCHMARKS[benchmark].score(pred, gold, row)  # the benchmark's rule (the registry, below)


IMAGE_COLUMNS = ("image", "decoded_image", "images")  # not sent to the scoring workers: no rule reads them


def score_job(benchmark: str, response: str, row: dict) -> dict:
    """{"correct", "timed_out": False} of one answer (score_answer); what eval.py's scoring workers run
    (reward.RewardPool(score_fn=score_job), with a hard per-answer time limit)."""
    return {"correct": bool(score_answer(benchmark, response, row)), "timed_out": False}


def timed_out_job(job: tuple) -> dict:
    """The result of an answer whose scoring ran past the time limit: wrong, and counted as timed out."""
    return {"correct": False, "timed_out": True}


def scoring_row(row: dict) -> dict:
    """The row without its image columns (the scoring rules read only text columns), for the workers."""
    return {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_image_paths(row: dict, folder: Path) -> dict:
    """The row with relative image paths (a str, or a {"path"} dict without bytes, in `image`,
    `decoded_image` or `images`) made relative to `folder`, the data file's folder, as training does."""

    def resolve(image):
        if isinstance(image, str) and image and not Path(image).is_absolute():
            return str(folder / image)
        if isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
            return {**image, "path": str(folder / image["path"])} if not Path(image["path"]).is_absolute() else image
        return image

    out = dict(row)
    for key in ("image", "decoded_image"):
        if key in out:
            out[key] = resolve(out[key])
    if isinstance(out.get("images"), (list, tuple)):
        out["images"] = [resolve(im) for im in out["images"]]
    return out


def read_benchmark_file(path: str | Path) -> list[dict]:
    """The rows of a local benchmark file (parquet, jsonl, or a .json array), every way it can fail
    said in one line naming the file (and the line, for jsonl / JSON): MissingDataError when it is
    not there, BadRowError when it does not parse, has a line that is no JSON object, or has no rows.
    Relative image paths are made relative to the file's folder (resolve_image_paths)."""
    file = Path(path)
    if not file.is_file():
        raise MissingDataError(f"{file}: no such file" if not file.exists() else f"{file}: a folder, not a file")
    if file.suffix == ".parquet":
        rows = _parquet_rows(file)
    elif file.suffix == ".json" and file.read_bytes()[:4096].lstrip().startswith(b"["):
        try:
            rows = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise BadRowError(f"{file}{where}: not valid JSON ({first_line(e)})") from e
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise BadRowError(f"{file} row {bad}: a JSON {type(rows[bad]).__name__}, not an object")
    elif file.suffix in (".jsonl", ".json"):
        rows = []
        for _, where, row in reward.jsonl_objects(file):
            if isinstance(row, str):
                raise BadRowError(f"{where}: {row}")
            rows.append(row)
    else:
        raise BadRowError(f"{file}: give a .parquet, .jsonl or .json file")
    if not rows:
        raise BadRowError(f"{file}: empty (no rows)")
    folder = file.resolve().parent
    return [resolve_image_paths(dict(r), folder) for r in rows]


def _parquet_rows(file: Path) -> list[dict]:
    """The rows of a parquet file through `datasets` (images decoded as the hub copies are), any
    failure of pyarrow or datasets as one BadRowError naming the file."""
    import datasets
    import pyarrow.parquet as pq

    try:
        if not pq.ParquetFile(file).metadata.num_rows:
            return []
        return [dict(r) for r in datasets.load_dataset("parquet", data_files=str(file), split="train")]
    except Exception as e:  # noqa: BLE001 - whatever pyarrow or datasets says, the file is unreadable
        raise BadRowError(f"{file}: not a readable parquet file ({first_line(e)})") from e


def load_benchmark(name: str, override: str | None, limit: int) -> list[dict]:
    """Raw rows of a benchmark in its own columns: a local parquet/jsonl file (`override`, through
    read_benchmark_file), or its hub ids (BENCHMARKS[name].hub_ids) tried in order, each failure said
    in one line; InputError naming every id tried when none loads (and for the toy, which has none)."""
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if override:
        rows = read_benchmark_file(override)
        return rows[:limit] if limit else rows
    import datasets

    spec = BENCHMARKS[name]
    if not spec.hub_ids:
        raise InputError(f"{name} has no hub copy: give its file (--bench-data {name}=<file>, or --val-data)")
    ds, failures = None, []
    for hub_id in spec.hub_ids:
        try:
            ds = datasets.load_dataset(hub_id, spec.subset, split=spec.split)
            break
        except Exception as e:  # noqa: BLE001 - any failure to resolve or read: try the next copy
            failures.append(f"{hub_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            more = f"; trying {spec.hub_ids[len(failures)]}" if len(failures) < len(spec.hub_ids) else ""
            print(f"[bench] {name}: could not load {hub_id} ({type(e).__name__}){more}")
    if ds is None:
        raise InputError(
            f"could not load {name} from the hub ({'; '.join(failures)}); "
            f"download it and pass --bench-data {name}=<file.parquet>"
        )
    rows = [dict(r) for r in ds]
    return rows[:limit] if limit else rows


def prompt_rows(name: str, raw: list[dict], min_pixels: int, max_pixels: int) -> tuple[list[dict], list[str]]:
    """The usable rows of a benchmark as prompt rows, and a line per unusable one.

    Each usable row is {"problem", "images", "answer", "id", "benchmark_row"}: the prompt the engine
    generates from (to_prompt_row, checked like training rows against [min_pixels, max_pixels]) and
    the raw row in the benchmark's columns that score_answer needs. Unusable rows (no image, no
    question or answer, an image the processor would refuse) are named in the second list.
    """
    usable, bad = [], []
    for i, row in enumerate(raw):
        row_id = str(row.get("id", row.get("pid", row.get("sample_index", i))))
        try:
            prompt = check_row(
                {**to_prompt_row(name, row), "answer": str(row.get("answer"))}, "rl", min_pixels, max_pixels
            )
            usable.append({**prompt, "id": row_id, "benchmark_row": row})
        except (ValueError, TypeError, KeyError) as e:
            bad.append(f"{name} row {i} (id={row_id}): {e}")
    return usable, bad


# ---------------------------------------------------------------------------------------------
# What the scoring rules read in a row, checked at load (so score_answer never meets a row it cannot read)
# ---------------------------------------------------------------------------------------------


def _number(value) -> float | None:
    """float(value) for a plain number or its text ('7', '2.5'), else None ('1,000', 'ten', None)."""
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def check_mathvista(row: dict) -> str | None:
    """What score_mathvista cannot read in a row, or None: multiple choice needs its `choices` (a
    list holding the gold text); an integer gold must be a plain integer ('1,000' is not), a float
    gold a plain number, `precision` a number."""
    gold = str(row.get("answer", "")).strip()
    if row.get("question_type") == "multi_choice":
        choices = row.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            return "multiple choice without choices"
        if reward.normalise_text(gold) not in [reward.normalise_text(str(c)) for c in choices]:
            return f"multiple choice whose answer {gold!r} is none of its choices"
        return None
    kind = row.get("answer_type")
    if kind == "integer" and (_number(gold) is None or not _number(gold).is_integer()):
        return f"integer answer {gold!r} is not a plain integer (write e.g. 1000, not 1,000)"
    if kind == "float" and _number(gold) is None:
        return f"float answer {gold!r} is not a plain number"
    if kind == "float" and row.get("precision") is not None and _number(row["precision"]) is None:
        return f"precision {row['precision']!r} is not a number"
    return None


def check_options(column: str) -> Callable[[dict], str | None]:
    """A check that `column` (MathVision `options`, the toy's `choices`) is absent or a list of texts."""

    def check(row: dict) -> str | None:
        value = row.get(column)
        if value is not None and not isinstance(value, (list, tuple)):
            return f"{column!r} is a {type(value).__name__}; give a list of option texts"
        return None

    return check


def no_check(row: dict) -> str | None:
    """The rule reads only the answer text: nothing more to check."""
    return None


# ---------------------------------------------------------------------------------------------
# The registry: one entry per benchmark, read by eval.py and grpo.py --val-benchmark
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives, how its rows become prompts, and how an answer is scored."""

    hub_ids: tuple[str, ...]  # tried in order: the paper's copy first, then where it moved (PAPER.md)
    subset: str | None  # the hub config
    split: str
    question: Callable[[dict], str] | None  # row -> user-turn text (None: the row is already an RL prompt row)
    image_columns: tuple[str, ...]  # where the row's image is; the first present wins
    system_prompt: str  # the system message it is asked under
    score: Callable[[str, str, dict], bool]  # (extracted answer, gold text, row) -> correct
    check: Callable[[dict], str | None]  # what `score` cannot read in a row (left out at load), or None


BENCHMARKS: dict[str, Benchmark] = {
    "mathverse": Benchmark(
        ("AI4Math/MathVerse",), "testmini", "testmini", mathverse_question, ("image",), EVAL_SYSTEM_PROMPT,
        score_mathverse, no_check,
    ),
    "mathvista": Benchmark(
        ("AI4Math/MathVista",), None, "testmini", mathvista_question, ("decoded_image", "image"),
        EVAL_SYSTEM_PROMPT, score_mathvista, check_mathvista,
    ),
    "mathvision": Benchmark(
        ("MathLLMs/MathVision",), None, "test", mathvision_question, ("decoded_image", "image"),
        EVAL_SYSTEM_PROMPT, score_mathvision, check_options("options"),
    ),
    "logicvista": Benchmark(
        ("lscpku/LogicVista",), None, "test", plain_question, ("image",), EVAL_SYSTEM_PROMPT,
        lambda pred, gold, row: score_logicvista(pred, gold), no_check,
    ),
    "chartqa": Benchmark(
        ("lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"), None, "test", plain_question, ("image",),
        EVAL_SYSTEM_PROMPT, lambda pred, gold, row: chartqa_relaxed(pred, gold), no_check,
    ),
    # the toy's test split, asked in its own format (no system prompt), no hub copy
    "toy": Benchmark(
        (), None, "test", None, ("images",), "",
        lambda pred, gold, row: reward.is_equivalent(pred, gold, row.get("choices")), check_options("choices"),
    ),
}  # fmt: skip
PAPER_BENCHMARKS = [name for name in BENCHMARKS if name != "toy"]  # the five of the paper's tables
