"""How an answer to each benchmark is scored: the rule of the benchmark's own official scorer, rule by
rule (sources and every difference in docs/eval.md), the fields each rule reads in a row, and the
strict exact-match reading `eval.py --compare-official` sets beside the verdicts.

Each `score_<benchmark>(pred, gold, row) -> bool` takes the extracted answer, the gold text and the row
in the benchmark's own columns; mmr1/benchmarks.py's registry names the rule of each benchmark.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import reward

# --- Shared readings: option texts, the option an answer names, labels, a value's text ---


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
    whitespace-normalised; the first on a tie); None if pred or choices are empty. MathVista's
    calculate_score.get_most_similar, granted only there (docs/eval.md)."""
    if not pred or not pred.strip() or not choices:
        return None
    p = reward.normalise_text(pred)
    distances = [levenshtein(p, reward.normalise_text(c)) for c in choices]
    return distances.index(min(distances))


def chosen_option(pred: str | None, choices: list[str], fallback: str | None = None) -> int | None:
    """The option a multiple-choice prediction names: its exact option text (case-insensitive), else its
    letter ('C', '(C)', 'C: 40°'); failing both, by `fallback`: None, no option; 'equivalent', the first
    option of the same value (mathverse_equal, MathVerse); 'similar', the most similar option (MathVista)."""
    if pred is None or not choices:
        return None
    texts = [reward.normalise_text(c) for c in choices]
    if reward.normalise_text(pred) in texts:
        return texts.index(reward.normalise_text(pred))
    letter = reward.choice_letter(pred, len(choices))
    if letter is not None:
        return reward.LETTERS.index(letter)
    if fallback == "equivalent":
        return next((i for i, c in enumerate(choices) if mathverse_equal(pred, c)), None)
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


# A quantity's name before '=': words and abbreviations ('Area', 'Surface Area', 'S.A. of rectangular
# prism', 'SA'), a variable ('r', 'y_2') or a function ('f(x)'); '' too ('$=(4,0)$')
_NAME = re.compile(r"(?:[A-Za-z][A-Za-z.]*(?: [A-Za-z][A-Za-z.]*){0,5}(?:_\{?\w{1,3}\}?)?(?:\([a-z]\))?)?")
# A unit at the end of a value, as the published golds write it once wrappers are gone ('9 \pi cm^{2}',
# '452.389 cubic units', '113.097 units ^{2}', '15.5 Litres', '4.4 m'); bounded runs only: linear time
_UNIT = re.compile(
    r"(?<=[\d\s}.])(?:(?:square|cubic|sq\.?|cu\.?) {1,2})?(?:units?|cm|mm|km|m|g|kg|mg|ml|litres?|liters?|"
    r"metres?|meters?|(?:centi|milli|kilo)met(?:er|re)s?|inch(?:es)?|ft|feet|yards?|miles?|km ?/ ?h)"
    r"(?: {0,2}\^ {0,2}(?:\{ {0,2}[23] {0,2}\}|[23]))? {0,4}$",
    flags=re.IGNORECASE,
)
MAX_VALUE_CHARS = 200  # longer texts are compared as written (no gold states a value at this length)


def stated_value(text: str) -> str:
    """The value a text states, as a reader takes it: after `Name =` ('Area $=9 \\pi \\mathrm{cm}^{2}$'
    -> '9 \\pi', 'slope =-4' -> '-4', 'Center $=(20,10)$' -> '(20,10)'), its unit dropped (as
    `\\mathrm{}` / `\\text{}` or as words: '452.389 cubic units' -> '452.389'), a true bearing's 'T'
    dropped ('230 ^\\circ T' -> '230°'). Only a single '=' after a name splits: an equation
    ('\\frac{x^2}{81}+\\frac{y^2}{9}=1') is kept whole. The sign is never touched."""
    if len(text) > MAX_VALUE_CHARS:
        return text
    s = re.sub(r"\\(text|mathrm|mbox) {1,4}\{", r"\\\1{", tidy_math(text).replace("$", " "))
    s = reward.clean_answer(re.sub(r"\{ {1,4}", "{", s))  # '\text { units }' -> 'units', '^\circ' -> '°'
    if s.count("=") == 1:
        name, _, value = s.partition("=")
        if _NAME.fullmatch(name.strip()) and value.strip():
            s = value.strip()
    s = _UNIT.sub("", s).strip() or s
    return re.sub(r"° {0,2}T$", "°", s)


def mathverse_equal(pred: str, gold: str) -> bool:
    """The same answer for MathVerse's judge: reward.is_equivalent on the texts (`√`, `π` and `~` read
    as LaTeX), or on the values they state (stated_value: '9\\pi' for 'Area $=9 \\pi \\mathrm{cm}^{2}$')."""
    pred, gold = tidy_math(pred), tidy_math(gold)
    if reward.is_equivalent(pred, gold):
        return True
    p, g = stated_value(pred), stated_value(gold)
    if p == reward.clean_answer(pred) and g == reward.clean_answer(gold):
        return False  # no name, unit or '$' inside to drop: the same comparison again
    return reward.is_equivalent(p, g)


# --- The rules, one per benchmark ---

_CHOICES_HEADER = re.compile(r"Choices?:")  # both spellings are in the published questions


def mathverse_options(question: str) -> list[str]:
    """Option texts of a MathVerse question, whose choices live in its text after its last "Choices:"
    (or "Choice:") as lines like "A:30°" / "(B) 40" / "C. 50", or on one line ("Choices: A. 148° B.
    152°"); [] when the question lists none (or not as consecutive letters from A)."""
    headers = list(_CHOICES_HEADER.finditer(question or ""))
    if not headers:
        return []
    tail = question[headers[-1].end() :]
    marks = list(re.finditer(r"(?:^|(?<=\s))\(?([A-H])\s*[:.)]\s*", tail))
    letters = [m.group(1) for m in marks]
    if len(marks) < 2 or letters != list(reward.LETTERS[: len(letters)]):
        return []
    ends = [m.start() for m in marks[1:]] + [len(tail)]
    return [tail[m.end() : end].strip() for m, end in zip(marks, ends)]


def score_mathverse(pred: str, gold: str, row: dict) -> bool:
    """MathVerse (score_answer_s2.py's GPT judge; docs/eval.md). multi-choice, gold letters: the option
    named (letter, option text, or a value equivalent to an option's text; row_options) is the gold one;
    several gold letters ('C\\nD'): the same set. Gold not a letter: the same value (mathverse_equal; a
    letter counts through its option's text). free-form: mathverse_equal. No most-similar mapping."""
    if row.get("question_type") != "multi-choice":
        return mathverse_equal(pred, gold)
    options = row_options("mathverse", row)
    gold_labels = choice_labels(gold)
    if gold_labels and all(label.isalpha() for label in gold_labels):
        if len(gold_labels) > 1:
            return choice_labels(pred) == gold_labels
        if options:
            picked = chosen_option(pred, options, fallback="equivalent")
            return picked is not None and reward.LETTERS[picked] == gold_labels[0]
        return reward.choice_letter(pred) == gold_labels[0]  # options not in the text: only a letter can match
    if mathverse_equal(pred, gold):
        return True
    picked = chosen_option(pred, options, fallback="equivalent")
    return picked is not None and mathverse_equal(options[picked], gold)


def mathvista_text(pred: str, unit: str | None) -> str:
    """A free-form MathVista answer's number as text, dropping as its answer extractor does the value before a
    last '=', the row's `unit` before or after it, and '$' (plain prefix / suffix tests: linear time)."""
    s = reward.clean_answer(final_value(pred)).replace("\\$", "$").strip()
    if unit and unit.strip():
        u = reward.clean_answer(unit).lower()
        if u and s.lower().startswith(u):
            s = s[len(u) :].strip()
        if u and s.lower().endswith(u):
            s = s[: len(s) - len(u)].strip()
    return s.strip("$").strip()


def mathvista_letter(pred: str, n_choices: int) -> int | None:
    """The option a MathVista answer names by letter, read first as calculate_score reads it: the first
    letter in parentheses anywhere, either case ('(E)', '(e)'), else the whole answer an upper-case
    letter; None when neither names one of the n_choices options."""
    s = reward.clean_answer(pred)
    found = re.search(r"\(([A-Za-z])\)", s)
    letter = found.group(1).upper() if found else s
    return reward.LETTERS.index(letter) if len(letter) == 1 and letter in reward.LETTERS[:n_choices] else None


def score_mathvista(pred: str, gold: str, row: dict) -> bool:
    """MathVista (calculate_score.py normalize_extracted_answer + safe_equal): multi_choice: the option named
    (mathvista_letter, else chosen_option with the official most-similar fallback) has the gold TEXT;
    integer: the number (unit dropped) equals the gold exactly; float: both rounded to `precision`
    decimals; list: equal without spaces; other: case-insensitive text. Fields: mathvista_fields."""
    if row["question_type"] == "multi_choice":
        choices = list(row["choices"])
        picked = mathvista_letter(pred, len(choices))
        if picked is None:
            picked = chosen_option(pred, choices, fallback="similar")
        return picked is not None and reward.normalise_text(choices[picked]) == reward.normalise_text(gold)
    kind = row["answer_type"]
    if kind == "integer":  # exact, also beyond float precision (123456788 is not 123456789)
        value, target = reward.read_number(mathvista_text(pred, row.get("unit"))), reward.read_number(gold)
        return value is not None and value.value == (target.value if target is not None else int(float(gold)))
    if kind == "float":  # reward.read_number drops its own units too; '45%' reads as 45 (stored so)
        value = reward.read_number(mathvista_text(pred, row.get("unit")))
        digits = int(float(row["precision"]))  # stored as a float, e.g. 1.0
        return value is not None and round(float(value.value), digits) == round(float(gold), digits)
    if kind == "list":
        return re.sub(r"\s", "", pred) == re.sub(r"\s", "", gold)
    return reward.normalise_text(pred) == reward.normalise_text(gold)


def mathvision_equal(pred: str, gold: str) -> bool:
    """MathVision's is_equal: reward.is_equivalent (on the answer or its value after '='), or both
    plain numbers equal after rounding to 2 decimals (MATH-V evaluation/utils.py rounds both to 2)."""
    pred, gold = tidy_math(pred), tidy_math(gold)
    if reward.is_equivalent(pred, gold) or reward.is_equivalent(final_value(pred), gold):
        return True
    p, g = reward.read_number(final_value(pred)), reward.read_number(gold)
    return p is not None and g is not None and round(float(p.value), 2) == round(float(g.value), 2)


def score_mathvision(pred: str, gold: str, row: dict) -> bool:
    """MathVision (MATH-V evaluation/evaluate.py: is_equal with the gold letter or the gold option's text):
    with options and a gold letter, the option named by its exact text or letter is the gold one, else the
    answer equals the gold option's text (mathvision_equal); otherwise mathvision_equal with the gold."""
    options = list(row.get("options") or [])
    letter = gold.upper() if len(gold) == 1 and gold.isalpha() else None
    if options and letter is not None and letter in reward.LETTERS[: len(options)]:
        gold_index = reward.LETTERS.index(letter)
        picked = chosen_option(pred, options)
        return picked == gold_index if picked is not None else mathvision_equal(pred, options[gold_index])
    return mathvision_equal(pred, gold)


def score_logicvista(pred: str, gold: str) -> bool:
    """LogicVista (eval/extract_accuracy_new.py): the same sorted labels (choice_labels: 'C, A' == 'A, C'; '3'
    for a numbered option); one gold label also matches an answer naming that letter ('C: 14'). A gold
    that is no label list is compared by reward.is_equivalent."""
    gold_labels = choice_labels(gold)
    if gold_labels is None:
        return reward.is_equivalent(pred, gold)
    pred_labels = choice_labels(pred)
    if pred_labels is None and len(gold_labels) == 1:
        letter = reward.choice_letter(pred)
        pred_labels = [letter] if letter is not None else None
    return pred_labels == gold_labels


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


# --- What the rules read in a row, checked at load (so a rule never meets a row it cannot read) ---


def mathvista_fields(row: dict) -> dict[str, str]:
    """{field: why} MathVista's rule reads in this row; a file with a row lacking one is refused at load."""
    fields = {"question_type": "multiple choice or free-form"}
    if row.get("question_type") == "free_form":
        fields["answer_type"] = "an integer, float, list or text comparison"
        if row.get("answer_type") == "float":
            fields["precision"] = "the decimals a float answer is compared at"
    return fields


def mathverse_fields(row: dict) -> dict[str, str]:
    """{field: why} MathVerse's rule reads: `question_type` (without it every row would be free-form)."""
    return {"question_type": "multi-choice (options read from the question) or free-form"}


def check_mathverse(row: dict) -> str | None:
    """What score_mathverse cannot read in a row, or None: `question_type` must be multi-choice or free-form."""
    if row.get("question_type") not in ("multi-choice", "free-form"):
        return f"question_type {row.get('question_type')!r} is neither multi-choice nor free-form"
    return None


def _number(value) -> float | None:
    """float(value) for a plain number or its text ('7', '2.5'), else None ('1,000', 'ten', None)."""
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def check_mathvista(row: dict) -> str | None:
    """What score_mathvista cannot read in a row, or None: `question_type` must be multi_choice or
    free_form; multiple choice needs its `choices` (a list holding the gold text); an integer gold
    must be a plain integer ('1,000' is not), a float gold a plain number, `precision` a number."""
    gold = str(row.get("answer", "")).strip()
    if row.get("question_type") not in ("multi_choice", "free_form"):
        return f"question_type {row.get('question_type')!r} is neither multi_choice nor free_form"
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
    if kind == "float" and _number(row.get("precision")) is None:
        return f"precision {row.get('precision')!r} is not a number"
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
    """The rule reads only the answer text: nothing more to check (and no field a row could lack)."""
    return None


# --- A strict reading beside the rules: what their leniency adds (eval.py --compare-official) ---


def row_options(benchmark: str, row: dict) -> list[str]:
    """The option texts a row offers, in order: MathVista `choices`, MathVision `options`, the options in
    a MathVerse question (mathverse_options), the toy's `choices`; [] for a row without options."""
    if benchmark == "mathverse":  # `question_for_eval` holds them where `question` is empty (Vision Only)
        return mathverse_options(str(row.get("question") or "")) or mathverse_options(
            str(row.get("question_for_eval") or "")
        )
    column = {"mathvista": "choices", "mathvision": "options", "toy": "choices"}.get(benchmark)
    value = row.get(column) if column else None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def strict_correct(extracted: str | None, gold: str, options: list[str] | None = None) -> bool:
    """The exact-match reading of an answer: its text equals the gold's after the clean-up every official
    scorer does (reward.normalise_text: case, spaces, `$`, `\\text{}` wrappers), or, with options, the
    answer is exactly an option letter ('C', '(C)') naming the gold option (the gold a letter, or that
    option's text). No value equivalence, units, rounding, tolerance or most-similar option."""
    if not extracted or not extracted.strip():
        return False
    if reward.normalise_text(extracted) == reward.normalise_text(gold):
        return True
    found = re.fullmatch(r"\(?([A-Z])\)?", reward.clean_answer(extracted))
    if not options or found is None or reward.LETTERS.index(found.group(1)) >= len(options):
        return False
    texts = [reward.normalise_text(o) for o in options]
    gold_text = reward.normalise_text(gold)
    gold_index = reward.LETTERS.index(gold.strip()) if re.fullmatch(r"[A-Z]", gold.strip()) else None
    if gold_index is None and gold_text in texts:
        gold_index = texts.index(gold_text)
    return reward.LETTERS.index(found.group(1)) == gold_index
