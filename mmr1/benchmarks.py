"""The five benchmarks of the paper: where each lives, how its rows become prompts, how a file of
its rows is read and checked, and which rule scores an answer (mmr1/benchmark_rules.py holds the rules,
each the rule of the benchmark's own official scorer).

`score_answer(benchmark, response, row)` is the one scoring entry point (eval.py re-exports it);
grpo.py uses the same rules for validation on a benchmark file (`--val-benchmark`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import reward

from .benchmark_rules import (
    chartqa_relaxed,
    check_mathverse,
    check_mathvista,
    check_options,
    mathverse_fields,
    mathvista_fields,
    no_check,
    score_logicvista,
    score_mathverse,
    score_mathvision,
    score_mathvista,
)
from .chat import EVAL_SYSTEM_PROMPT
from .config import BadRowError, InputError, MissingDataError, first_line, loads_json
from .data import decode_images, resolve_image_paths
from .layouts import is_json_array
from .prepare import normalise

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


# --- Rows of each benchmark -> prompt rows (problem, images), and the breakdown keys ---


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


def breakdown(benchmark: str, row: dict) -> dict[str, str]:
    """{column: value} of the categories a row is reported under (the registry's `breakdowns`, looked up
    in the row, then in its `metadata` dict); a list value (LogicVista skills) is joined by ', ', a column
    the row lacks is left out."""
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    out = {}
    for key in BENCHMARKS[benchmark].breakdowns:
        value = row.get(key, metadata.get(key))
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        if value not in (None, ""):
            out[key] = str(value)
    return out


# --- Scoring: the benchmark's rule (mmr1/benchmark_rules.py), in the scoring workers ---


def score_answer(benchmark: str, response: str, row: dict) -> bool:
    """Whether `response` answers `row` (in the benchmark's own columns) correctly, by the benchmark's
    official rule (a name of BENCHMARKS; docs/eval.md has the rules and their sources)."""
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


def timed_out_job(job: dict) -> dict:
    """The result of an answer whose scoring ran past the time limit: wrong, and counted as timed out."""
    return {"correct": False, "timed_out": True}


# --- Loading ---


def read_benchmark_file(path: str | Path) -> list[dict]:
    """The rows of a local benchmark file (parquet, jsonl, or a .json array), image paths resolved as training
    does (data.resolve_image_paths). Every failure is one line naming the file (and the line, for jsonl / JSON):
    MissingDataError when it is not there, BadRowError when it does not parse, has a line that is no
    JSON object, or has no rows."""
    file = Path(path)
    if not file.is_file():
        raise MissingDataError(f"{file}: no such file" if not file.exists() else f"{file}: a folder, not a file")
    if file.suffix == ".parquet":
        rows = _parquet_rows(file)
    elif is_json_array(file):
        try:
            rows = loads_json(file.read_text(encoding="utf-8"))  # deep nesting: a JSONDecodeError too
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise BadRowError(f"{file}{where}: not valid JSON ({first_line(e)})") from e
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise BadRowError(f"{file} row {bad}: a JSON {type(rows[bad]).__name__}, not an object")
    elif file.suffix in (".jsonl", ".json"):
        rows = jsonl_rows(file)
    else:
        raise BadRowError(f"{file}: give a .parquet, .jsonl or .json file")
    if not rows:
        raise BadRowError(f"{file}: empty (no rows)")
    folder = file.resolve().parent
    return [resolve_image_paths(r, folder) for r in rows]


def jsonl_rows(file: Path) -> list[dict]:
    """The objects of a jsonl file (reward.jsonl_objects); its first bad line is one BadRowError naming
    the file and line: not UTF-8, not JSON (nested too deeply included), or not an object."""
    rows = []
    for _, where, row in reward.jsonl_objects(file):
        if isinstance(row, str):
            raise BadRowError(f"{where}: {row}")
        rows.append(row)
    return rows


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
        return check_fields(name, rows[:limit] if limit else rows, override)
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
            failures.append(f"{hub_id}: {first_line(e)}")
            more = f"; trying {spec.hub_ids[len(failures)]}" if len(failures) < len(spec.hub_ids) else ""
            print(f"[bench] {name}: could not load {hub_id} ({type(e).__name__}){more}")
    if ds is None:
        raise InputError(
            f"could not load {name} from the hub ({'; '.join(failures)}); "
            f"download it and pass --bench-data {name}=<file.parquet>"
        )
    rows = [dict(r) for r in ds]
    return check_fields(name, rows[:limit] if limit else rows, hub_id)


def check_fields(name: str, rows: list[dict], source: str) -> list[dict]:
    """The rows, once every one carries the fields its benchmark's rule reads (the registry's `fields`);
    otherwise BadRowError naming the source, the row and the field: the whole file is refused, since a
    rule reading an absent field would score silently wrong (docs/eval.md)."""
    for i, row in enumerate(rows):
        for field, why in BENCHMARKS[name].fields(row).items():
            if row.get(field) is None:
                row_id = row.get("id", row.get("pid", row.get("sample_index", i)))
                raise BadRowError(
                    f"{source} row {i} (id={row_id}): no {field!r}; {name}'s rule reads it ({why}), "
                    "so every row needs it"
                )
    return rows


def prompt_rows(name: str, raw: list[dict], min_pixels: int, max_pixels: int) -> tuple[list[dict], list[str]]:
    """The usable rows of a benchmark as {"problem", "images", "answer", "id", "benchmark_row"}: the prompt
    (to_prompt_row, checked like training rows against [min_pixels, max_pixels]) and the raw row that
    score_answer reads; and a line naming each unusable row (no image, question or answer, a bad image)."""
    usable, bad = [], []
    for i, row in enumerate(raw):
        row_id = str(row.get("id", row.get("pid", row.get("sample_index", i))))
        try:
            prompt = normalise({**to_prompt_row(name, row), "answer": str(row.get("answer"))}, "rl")
            prompt = decode_images(prompt, min_pixels, max_pixels)
            usable.append({**prompt, "id": row_id, "benchmark_row": row})
        except (ValueError, TypeError, KeyError) as e:
            bad.append(f"{name} row {i} (id={row_id}): {e}")
    return usable, bad


# --- The registry: one entry per benchmark, read by eval.py and grpo.py --val-benchmark ---


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
    breakdowns: tuple[str, ...] = ()  # the columns its score is reported by (its own paper / scorer)
    # {field: why} `score` reads in a row (benchmark_rules.*_fields): a file with a row lacking one is refused
    fields: Callable[[dict], dict[str, str]] = lambda row: {}


BENCHMARKS: dict[str, Benchmark] = {
    "mathverse": Benchmark(
        ("AI4Math/MathVerse",), "testmini", "testmini", mathverse_question, ("image",), EVAL_SYSTEM_PROMPT,
        score_mathverse, check_mathverse, ("problem_version", "subject"), mathverse_fields,
    ),
    "mathvista": Benchmark(
        ("AI4Math/MathVista",), None, "testmini", mathvista_question, ("decoded_image", "image"),
        EVAL_SYSTEM_PROMPT, score_mathvista, check_mathvista, ("question_type", "task"), mathvista_fields,
    ),
    "mathvision": Benchmark(
        ("MathLLMs/MathVision",), None, "test", mathvision_question, ("decoded_image", "image"),
        EVAL_SYSTEM_PROMPT, score_mathvision, check_options("options"), ("subject", "level"),
    ),
    "logicvista": Benchmark(
        ("lscpku/LogicVista",), None, "test", plain_question, ("image",), EVAL_SYSTEM_PROMPT,
        lambda pred, gold, row: score_logicvista(pred, gold), no_check, ("skill",),
    ),
    "chartqa": Benchmark(
        ("lmms-lab/ChartQA", "lmms-lab-encoder/ChartQA"), None, "test", plain_question, ("image",),
        EVAL_SYSTEM_PROMPT, lambda pred, gold, row: chartqa_relaxed(pred, gold), no_check, ("type",),
    ),
    # the toy's test split, asked in its own format (no system prompt), no hub copy
    "toy": Benchmark(
        (), None, "test", None, ("images",), "",
        lambda pred, gold, row: reward.is_equivalent(pred, gold, row.get("choices")), check_options("choices"),
        ("family",),
    ),
}  # fmt: skip
PAPER_BENCHMARKS = [name for name in BENCHMARKS if name != "toy"]  # the five of the paper's tables
