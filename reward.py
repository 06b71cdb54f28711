"""Rule-based rewards: answer extraction, format reward, accuracy reward, answer equivalence.

Used by grpo.py (training reward), eval.py (benchmark scoring) and vas.py (pass rates), so a
response is judged the same way everywhere. Pure functions; nothing runs at import time; model
output is never eval'd or exec'd.

    python reward.py preds.jsonl                  # rows with "response", "answer", optional "choices"
    python reward.py preds.jsonl --out scores.jsonl --workers 2 --timeout-s 5
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import multiprocessing as mp
import numbers
import re
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from multiprocessing.connection import wait
from pathlib import Path

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
REL_TOL = 1e-6  # a decimal prediction matches a fraction gold when |pred - gold| <= REL_TOL * max(1, |gold|)
MAX_MATH_VERIFY_CHARS = 500  # longer answers skip symbolic checking (cost, not correctness)
MAX_EXPONENT = 400  # '1e400' is read, '1e401' is no number: refused before 10^n is built
_FLOAT_MAX = Fraction(sys.float_info.max)  # a number beyond float's range is no number (callers take its float)


# --- Extraction and format ---
def last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` in text (nested braces allowed), else None."""
    starts = [m.end() - 1 for m in re.finditer(r"\\boxed\s*\{", text)]
    stack, pairs = [], {}  # {index of '{': index of its matching '}'}, one linear pass
    for i, ch in enumerate(text if starts else ""):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
    for s in reversed(starts):
        if s in pairs:
            return text[s + 1 : pairs[s]].strip()
    return None


def _answer_block(text: str) -> str | None:
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return None if start < 0 else text[start + len("<answer>") : end]


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response as a string: the last `\\boxed{}` inside the last
    `<answer>...</answer>`; else the last `\\boxed{}` anywhere; else the stripped `<answer>` content (if
    non-empty and with no `\\boxed` in it); else None. An answer block whose `\\boxed{` is never closed
    is malformed, not a bare answer: `<answer>\\boxed{3</answer>` extracts nothing."""
    if not isinstance(text, str):
        return None
    block = _answer_block(text)
    if block is not None and (boxed := last_boxed(block)) is not None:
        return boxed
    if (boxed := last_boxed(text)) is not None:
        return boxed
    if block is not None and block.strip() and not re.search(r"\\boxed\s*\{", block):
        return block.strip()
    return None


def format_reward(text: str | None) -> float:
    """1.0 when text is exactly `<think>...</think><answer>...\\boxed{...}...</answer>`, else 0.0.

    Whitespace around and between the two blocks is allowed; nothing else may stand outside
    them, each tag appears once, and the answer block holds a closed `\\boxed{}`.
    """
    if not isinstance(text, str):
        return 0.0
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return 0.0
    between = body[body.index("</think>") + len("</think>") : body.index("<answer>")]
    if between.strip():
        return 0.0
    return 1.0 if last_boxed(_answer_block(body) or "") is not None else 0.0


# --- Equivalence ---
_UNITS = (r"(?:cm|mm|km|m|kg|g|mg|s|sec|seconds|minutes|min|hours|h|units?|degrees?|dollars?|cents?|inch(?:es)?"
          r"|ft|feet|meters?|°)")  # fmt: skip
_UNIT_SUFFIX = re.compile(r"\s{0,4}" + _UNITS + r"$")  # '5 cm', '145°' (a bounded run: linear time)
# Digits with optional thousands separators: ',' or one space (NBSP, narrow NBSP and thin space are spaces
# after NFKC) between groups of exactly three digits, the same separator throughout; or a bare '.5'.
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d{1,3}(?: \d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
)
_LATEX_FRACTION = re.compile(r"([-+]?)\\[dt]?frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}")
_SLASH_FRACTION = re.compile(r"([-+]?)(\d+(?:\.\d+)?) ?/ ?(\d+(?:\.\d+)?)")


# Read as ASCII after NFKC: the Unicode minus and fraction / division slashes (NFKC gives '½' as '1⁄2').
_ASCII_LOOKALIKES = str.maketrans({"\u2212": "-", "\u2044": "/", "\u2215": "/"})
# Superscript digits become '^d' BEFORE NFKC, which would otherwise fold '2²' into '22'.
_SUPERSCRIPTS = str.maketrans({c: "^" + d for c, d in zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")})


def unicode_clean(s: str) -> str:
    """NFKC form (full-width `Ａ（１）` -> `A(1)`, `½` -> `1/2`, a decomposed `é` composed, NBSP and other
    spaces -> ' ', `x²` -> `x^2`), format characters (category Cf: zero-width spaces and joiners,
    bidi marks, soft hyphen, BOM) removed, the Unicode minus and fraction slash read as '-' and '/'."""
    s = unicodedata.normalize("NFKC", s.translate(_SUPERSCRIPTS))
    s = "".join(c for c in s if unicodedata.category(c) != "Cf")
    return s.translate(_ASCII_LOOKALIKES)


def clean_answer(s: str) -> str:
    """unicode_clean(s) without `$`, `\\text{}`/`\\mathrm{}` wrappers, `\\left/\\right`, `\\!` or a trailing period."""
    s = unicode_clean(s).strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("^\\circ", "°").replace("^{\\circ}", "°").replace("\\%", "%")
    return s.strip().rstrip(".").strip()


@dataclass(frozen=True)
class Number:
    """A plain number as written: its exact value, whether it had a '%' sign, how it was written
    ("integer", "decimal" incl. '1e3', "fraction" for '3/4' / '\\frac{3}{4}') and, for a decimal,
    the decimal places its last written digit stands for ('3.14' -> 2, '1.5e-3' -> 4, '1e3' -> 0)."""

    value: Fraction
    percent: bool
    kind: str
    places: int = 0


def read_number(s: str) -> Number | None:
    """The Number of an answer like '1,000', '1 000' (a space, no-break, narrow no-break or thin space
    between groups of three digits), '-3.5', '12.5%', '3/4', '145°', '\\frac{3}{4}', '5 cm'; None when s is
    not a single number. Linear time: no pattern with nested repetition runs on the whole string."""
    s = clean_answer(s)
    if len(s) > 96:  # longer than any plain number with its unit
        return None
    s = _UNIT_SUFFIX.sub("", s).strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    frac = _LATEX_FRACTION.fullmatch(s) or _SLASH_FRACTION.fullmatch(s)
    if frac:
        den = Fraction(frac.group(3))
        if den == 0:
            return None
        value = Fraction(frac.group(2)) / den
        return Number(-value if frac.group(1) == "-" else value, percent, "fraction")
    if len(s) > 64 or not _NUMBER.fullmatch(s):
        return None
    digits = s.replace(",", "").replace(" ", "")
    mantissa, _, exponent = digits.lower().partition("e")
    if abs(int(exponent or 0)) > MAX_EXPONENT:  # checked on the written exponent, before any arithmetic
        return None
    decimals = len(mantissa.partition(".")[2])
    kind = "decimal" if "." in mantissa or exponent else "integer"
    try:
        value = Fraction(digits)
    except (ValueError, ZeroDivisionError):
        return None
    if abs(value) > _FLOAT_MAX:
        return None
    return Number(value, percent, kind, max(0, decimals - int(exponent or 0)))


def _round_half_up(x: Fraction, places: int) -> Fraction:
    """x rounded to `places` decimals, halves away from zero (as a written decimal is read)."""
    scale = Fraction(10) ** places
    rounded = math.floor(abs(x) * scale + Fraction(1, 2))
    return Fraction(rounded if x >= 0 else -rounded) / scale


def _values_equal(p: Fraction, p_number: Number, g: Fraction, g_number: Number) -> bool:
    """Integers and decimals exactly; a fraction against a decimal gold by the gold's written precision
    (1/3 is 0.33 at two places); a decimal prediction against a fraction gold within REL_TOL."""
    if p == g:
        return True
    if p_number.kind == "fraction" and g_number.kind == "decimal":
        return _round_half_up(p, g_number.places + (2 if g_number.percent else 0)) == g
    if p_number.kind == "decimal" and g_number.kind == "fraction":
        return abs(p - g) <= REL_TOL * max(1, abs(g))
    return False


def _numbers_equal(pred: Number, gold: Number) -> bool:
    """Numeric match (_values_equal); a '%' on one side also allows the /100 reading of it."""
    p, g = pred.value, gold.value
    if _values_equal(p, pred, g, gold):
        return True
    if pred.percent and not gold.percent:
        return _values_equal(p / 100, pred, g, gold)
    if gold.percent and not pred.percent:
        return _values_equal(p, pred, g / 100, replace(gold, places=gold.places + 2, percent=False))
    return False


def choice_letter(s: str, n_choices: int = 26) -> str | None:
    """The option letter a multiple-choice answer names: 'C', '(C)', 'C.', 'C: 40°', 'C) text'."""
    s = clean_answer(s)
    m = re.fullmatch(r"\(?([A-Za-z])\)?(?:\s*[.:)]\s*.*|\s+.*)?", s, flags=re.DOTALL)
    if not m or (len(s) > 1 and s[0].islower() and not s.startswith("(")):
        return None
    letter = m.group(1).upper()
    return letter if LETTERS.index(letter) < n_choices else None


def normalise_text(s: str) -> str:
    """clean_answer(s), lower-cased, runs of whitespace folded to one space."""
    return re.sub(r"\s+", " ", clean_answer(s)).lower()


def _as_list(s: str) -> tuple[str, list[str]] | None:
    """(brackets, items) of '[a, b]', '(a, b]', 'a, b'; None for a single item."""
    s = clean_answer(s)
    brackets = ""
    if len(s) > 2 and s[0] in "[(" and s[-1] in "])":
        brackets, s = s[0] + s[-1], s[1:-1]
    parts = [p.strip() for p in s.split(",")]
    return (brackets, parts) if len(parts) > 1 and all(parts) else None


def _math_verify(pred: str, gold: str) -> bool:
    """Math-Verify on both sides wrapped in \\boxed{} (bare strings parse badly), gold first, with no sign
    lost (docs/reward.md "Signs"): '°' back to '^{\\circ}', and "equal" sides of negative ratio refused."""
    if len(pred) > MAX_MATH_VERIFY_CHARS or len(gold) > MAX_MATH_VERIFY_CHARS:
        return False
    from math_verify import parse, verify

    timeout = 3 if _alarm_free() else None  # Math-Verify's timeouts use SIGALRM too
    try:
        gold_parsed = parse("\\boxed{" + gold.replace("°", "^{\\circ}") + "}", parsing_timeout=timeout)
        pred_parsed = parse("\\boxed{" + pred.replace("°", "^{\\circ}") + "}", parsing_timeout=timeout)
        if not (gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout)):
            return False
    except Exception:  # noqa: BLE001 - a parser failure means "not shown equal"
        return False
    return not _sign_flipped(pred_parsed[0], gold_parsed[0])


def _alarm_free() -> bool:
    """Whether SIGALRM may bound a call here: the main thread (signals reach it only), no timer running
    (a caller's deadline, _call_bounded's)."""
    return threading.current_thread() is threading.main_thread() and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def _sign_flipped(pred, gold) -> bool:
    """Whether two sympy expressions differ by a negative constant factor (pred / gold < 0) and are not 0."""
    from sympy import Expr

    if not (isinstance(pred, Expr) and isinstance(gold, Expr)):
        return False  # sets, intervals, relations: Math-Verify compares them element by element
    try:
        ratio = pred / gold  # a number when the two differ by a constant factor
        return bool(ratio.is_number and ratio.is_negative) and gold.is_zero is not True
    except Exception:  # noqa: BLE001 - no ratio (e.g. 0 / 0): no sign to compare
        return False


def answer_text(value) -> str:
    """The gold answer (a JSON / parquet value) as the string is_equivalent compares: str itself, int its
    digits, float its shortest round-trip text (3.0 -> '3'), a list ONE answer of ordered parts joined by
    ', '. ValueError for bool (ambiguous), NaN / infinity, empty or nested lists, dicts, None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError(f"answer is a bool ({value}); write it as text, e.g. 'Yes' or 'True'")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"answer is {x}, not a usable number")
        return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("answer is an empty list")
        if any(isinstance(v, (list, tuple, dict)) for v in value):
            raise ValueError("answer is a nested list; give a list of numbers or strings")
        parts = [answer_text(v).strip() for v in value]
        if any(not p or "," in p for p in parts):
            raise ValueError(f"answer list {value!r} has an empty part or a part with ',' (parts are joined by ', ')")
        return ", ".join(parts)
    raise ValueError(f"answer is a {type(value).__name__}; give a string, a number or a list of them")


def is_equivalent(pred: str | None, gold: str | None, choices: list[str] | None = None) -> bool:
    """Whether a predicted answer matches the gold answer; the first rule that applies decides (docs/reward.md
    has the tables): 1. multiple choice (gold a letter, or `choices`: the letter or option text named);
    2. plain numbers on both sides, exactly (_numbers_equal); 3. lists / tuples element by element;
    4. case-insensitive text after cleanup; 5. Math-Verify. None or empty on either side never matches."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if not unicode_clean(pred).strip() or not unicode_clean(gold).strip():
        return False
    if choices:
        return _choice_equal(pred, gold, choices)
    gold_letter = choice_letter(gold)
    if gold_letter is not None and len(clean_answer(gold)) <= 3:
        return choice_letter(pred) == gold_letter
    p_num, g_num = read_number(pred), read_number(gold)
    if p_num is not None and g_num is not None:
        return _numbers_equal(p_num, g_num)
    p_list, g_list = _as_list(pred), _as_list(gold)
    if p_list is not None and g_list is not None:
        (p_brackets, p_items), (g_brackets, g_items) = p_list, g_list
        same_shape = len(p_items) == len(g_items) and (p_brackets == g_brackets or not (p_brackets and g_brackets))
        if same_shape and all(is_equivalent(p, g) for p, g in zip(p_items, g_items)):
            return True
    if normalise_text(pred) == normalise_text(gold):
        return True
    return _math_verify(clean_answer(pred), clean_answer(gold))


def _choice_equal(pred: str, gold: str, choices: list[str]) -> bool:
    texts = [normalise_text(c) for c in choices]

    def as_index(s: str) -> int | None:  # the option s names: by its text, else by its letter
        t = normalise_text(s)
        if t in texts:
            return texts.index(t)
        letter = choice_letter(s, len(choices))
        return LETTERS.index(letter) if letter is not None else None

    g, p = as_index(gold), as_index(pred)
    if g is None:  # gold names no option: compare as free-form
        return is_equivalent(pred, gold)
    return p == g


def accuracy_reward(text: str | None, gold: str | None, choices: list[str] | None = None) -> float:
    """1.0 when the answer extracted from the response is equivalent to gold, else 0.0."""
    return 1.0 if is_equivalent(extract_answer(text), gold, choices) else 0.0


# --- Batched scoring with a hard per-response timeout ---
@dataclass(frozen=True)
class Scoring:
    """How a response is scored, one value given to every caller of score_responses (training rewards,
    validation, VAS pass rates, SFT accuracy), so no caller's rule can differ: overall = format_weight *
    format + accuracy_weight * accuracy (the paper: 1 and 1), accuracy 1.0 when answer_rule(extracted,
    gold, choices) holds (a module-level function: the workers receive it by name)."""

    format_weight: float = 1.0
    accuracy_weight: float = 1.0
    answer_rule: Callable[[str | None, str | None, list[str] | None], bool] = is_equivalent


def score_one(response: str | None, gold: str | None, choices: list[str] | None = None,
              scoring: Scoring = Scoring()) -> dict:  # fmt: skip
    """{"overall", "format", "accuracy", "timed_out"} of one response under `scoring`."""
    fmt = format_reward(response)
    acc = 1.0 if scoring.answer_rule(extract_answer(response), gold, choices) else 0.0
    overall = scoring.format_weight * fmt + scoring.accuracy_weight * acc
    return {"overall": overall, "format": fmt, "accuracy": acc, "timed_out": False}


def _timed_out(job: dict) -> dict:
    """A response whose scoring ran out of time: format still counts, accuracy is 0."""
    fmt = format_reward(job["response"])
    return {"overall": job["scoring"].format_weight * fmt, "format": fmt, "accuracy": 0.0, "timed_out": True}


class ScoringError(RuntimeError):
    """A scoring function raised (a bug, e.g. a wrong signature): the run stops, naming the response."""


def _failure(index: int, job: dict, error: str) -> str:
    response = str(job.get("response"))
    shown = response[:80] + ("..." if len(response) > 80 else "")
    return f"scoring response {index} ({shown!r}) raised {error}"


class _OutOfTime(BaseException):  # a BaseException: no `except Exception` inside a parser swallows it
    """A response's in-process scoring ran past its limit (raised by SIGALRM's handler)."""


def _call_bounded(score_fn: Callable[..., dict], job: dict, timeout_s: float) -> dict:
    """score_fn(**job) in this process, stopped by SIGALRM after timeout_s (_OutOfTime); unbounded where
    no alarm may be set (_alarm_free)."""
    if not _alarm_free():
        return score_fn(**job)

    def out_of_time(signum, frame):
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return score_fn(**job)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score_in_process(jobs: list[dict], timeout_s: float, score_fn: Callable[..., dict] = score_one,
                     timeout_result=None) -> list[dict]:  # fmt: skip
    """RewardPool.map without workers: each score_fn(**job) in this process under a timeout_s limit
    (_call_bounded); a job past it gets timeout_result(job); an exception is a ScoringError."""
    import math_verify  # noqa: F401 - imported before any time limit: an import cut short would stay broken

    results = []
    for index, job in enumerate(jobs):
        try:
            results.append(_call_bounded(score_fn, job, timeout_s))
        except _OutOfTime:
            results.append((timeout_result or _timed_out)(job))
        except Exception as e:  # noqa: BLE001 - any bug in a scoring function: named, never a timeout
            raise ScoringError(_failure(index, job, f"{type(e).__name__}: {e}")) from e
    return results


# The signals a stage's own process handles (Ctrl-C; SIGTERM / SIGUSR1: save a checkpoint and exit). A
# scheduler sends them to the whole process group: a worker ignores them and lives on while its parent saves.
PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
MAX_START_FAILURES = 3  # a slot whose worker dies this many times in a row before ready: the pool gives up


def _worker(conn, score_fn) -> None:
    """A scoring process: ignores PARENT_SIGNALS (blocked since its start: RewardPool._start), says "ready",
    then answers each (index, job) with (index, score_fn(**job), None) or (index, None, error) until None."""
    for sig in PARENT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PARENT_SIGNALS)  # one sent meanwhile is dropped
    try:
        conn.send("ready")  # started and imported (score_fn unpickled): only now does a job's clock run
        while (job := conn.recv()) is not None:
            index, kwargs = job
            try:
                conn.send((index, score_fn(**kwargs), None))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which names the response
                conn.send((index, None, f"{type(e).__name__}: {e}"))
    except (EOFError, OSError):  # the parent is gone: nothing left to score
        return


class RewardPool:
    """Worker processes running score_fn(**job) (module-level; default score_one on {"response", "gold",
    "choices", "scoring"}), each killed and replaced past timeout_s; such a job gets timeout_result(job).
    Reuse one (a context manager) to pay the start-up once. A job's clock starts at its dispatch to a
    ready worker; workers ignore PARENT_SIGNALS; a dead one is replaced, its job sent again (docs/reward.md
    "Workers"). With 0 workers, map scores in this process under the same limit (score_in_process)."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, score_fn=score_one, timeout_result=None):
        self.workers, self.timeout_s, self.score_fn = workers, timeout_s, score_fn
        self.timeout_result = timeout_result or _timed_out
        self.ctx = mp.get_context("spawn")  # no fork of a threaded (torch) parent
        self.ready: set[int] = set()  # slots whose worker has reported ready
        self.start_failures = [0] * workers  # deaths before ready, in a row, per slot
        self.procs: list = [self._start() for _ in range(workers)]
        # Before multiprocessing's own exit hook (registered earlier, run later), which would SIGTERM
        # the daemon workers (ignored) and wait for them forever.
        self._kill_at_exit = lambda procs=self.procs: [proc.kill() for proc, _ in procs]
        atexit.register(self._kill_at_exit)

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.score_fn), daemon=True)
        # The child inherits the blocked mask: a group-wide signal during its start-up waits, then is
        # dropped when the worker ignores it; the parent's own wait until it unblocks them here.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()
        return [proc, parent]

    def map(self, jobs: list[dict]) -> list[dict]:
        """score_fn(**job) of each job, in input order; a job past timeout_s (its worker killed and
        replaced), or whose worker died under it twice, gets timeout_result(job). ScoringError (after
        the jobs in flight) when score_fn raised, naming the first such response in input order."""
        if self.workers == 0:
            return score_in_process(jobs, self.timeout_s, self.score_fn, self.timeout_result)
        results: list[dict | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        deaths = [0] * len(jobs)
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (job index, start time)
        errors: list[tuple[int, str]] = []  # (job index, message): whichever worker answers first
        while pending or busy:
            for slot in range(self.workers):
                if slot in self.ready and slot not in busy and pending:
                    index = pending.pop()
                    try:
                        self.procs[slot][1].send((index, jobs[index]))
                    except OSError:  # died while idle (BrokenPipeError): a fresh one takes the job
                        pending.append(index)
                        self._restart(slot)
                        continue
                    busy[slot] = (index, time.monotonic())
            starting = [slot for slot in range(self.workers) if slot not in self.ready]
            conns = {self.procs[slot][1]: slot for slot in [*busy, *starting]}
            for conn in wait(list(conns), timeout=0.05):
                slot = conns[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the worker died
                    message = None
                if slot not in self.ready:  # a fresh worker's "ready", or its death while starting
                    self._started(slot, message == "ready")
                    continue
                index = busy.pop(slot)[0]
                if message is None:
                    self._restart(slot)
                    deaths[index] += 1
                    if deaths[index] < 2:
                        pending.append(index)
                    else:
                        results[index] = self.timeout_result(jobs[index])
                    continue
                _, results[index], error = message
                if error is not None:
                    errors.append((index, _failure(index, jobs[index], error)))
                    pending.clear()  # finish the jobs in flight, so the pool stays usable, then raise
            now = time.monotonic()
            for slot, (index, started) in list(busy.items()):
                if now - started > self.timeout_s:
                    results[index] = self.timeout_result(jobs[index])
                    self._restart(slot)
                    del busy[slot]
        if errors:
            first = min(errors)[1]
            raise ScoringError(first + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        return results  # type: ignore[return-value]

    def _started(self, slot: int, ok: bool) -> None:
        self.start_failures[slot] = 0 if ok else self.start_failures[slot] + 1
        if ok:
            self.ready.add(slot)
        elif self.start_failures[slot] < MAX_START_FAILURES:
            self._restart(slot)
        else:
            raise RuntimeError(
                f"a reward worker died while starting, {MAX_START_FAILURES} times in a row (see its error above)"
            )

    def _restart(self, slot: int) -> None:
        proc, conn = self.procs[slot]
        proc.kill()
        proc.join()
        conn.close()
        self.ready.discard(slot)
        self.procs[slot] = self._start()

    def close(self) -> None:
        """Asks every worker to exit, then kills any that has not within a second."""
        for proc, conn in self.procs:
            with contextlib.suppress(OSError):  # already gone (BrokenPipeError)
                conn.send(None)
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()
                proc.join()
        atexit.unregister(self._kill_at_exit)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compute_rewards(responses: list[str], golds: list[str], choices: list | None = None, *, workers: int = 2,
                    timeout_s: float = 5.0, scoring: Scoring = Scoring(),
                    pool: RewardPool | None = None) -> list[dict]:  # fmt: skip
    """Per response {"overall", "format", "accuracy", "timed_out"} under `scoring`, in input order, each
    under a hard limit of timeout_s seconds (a pool's own with a pool; past it: accuracy 0, timed_out
    True): in worker processes with workers > 0 or a pool, in this process (SIGALRM) with workers = 0."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    choices = choices if choices is not None else [None] * len(responses)
    jobs = [{"response": r, "gold": g, "choices": c, "scoring": scoring} for r, g, c in zip(responses, golds, choices)]
    if pool is not None:
        return pool.map(jobs)
    with RewardPool(max(0, workers), timeout_s) as own_pool:  # 0 workers: score_in_process
        return own_pool.map(jobs)


def score_responses(
    responses: list[str], rows: list[dict], scoring: Scoring, *, pool: RewardPool | None = None, timeout_s: float = 5.0
) -> list[dict]:
    """compute_rewards of responses[i] against rows[i]["answer"] (and ["choices"]) under `scoring`: rollouts'
    rewards, each against its prompt's row; in the pool when given (its own limit), else in this process."""
    golds, choices = [r["answer"] for r in rows], [r.get("choices") for r in rows]
    return compute_rewards(responses, golds, choices, workers=0, timeout_s=timeout_s, scoring=scoring, pool=pool)


# --- CLI ---
def jsonl_objects(path: Path):
    """Yields (line number from 1, "<path> line <n>", the line's JSON object) per non-blank line of a
    jsonl file; for a line not UTF-8, not JSON (too deeply nested included) or not an object, the third
    item is a string saying so, and reading goes on."""
    from mmr1.config import loads_json  # json.loads, with deep nesting a JSONDecodeError

    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path} line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, where, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
            continue
        if not line.strip():
            continue
        try:
            row = loads_json(line)
        except json.JSONDecodeError as e:
            yield n, where, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        yield n, where, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"


def read_predictions(path: Path) -> tuple[list[dict], list[str]]:
    """The scorable rows of a predictions jsonl, each with its 1-based `line`, and one message per
    line that could not be used (not UTF-8, not JSON, no 'response' / 'answer', unusable answer)."""
    rows, problems = [], []
    for n, where, row in jsonl_objects(path):
        try:
            if isinstance(row, str):  # what jsonl_objects found wrong with the line
                raise ValueError(row)
            if "response" not in row or "answer" not in row:
                raise ValueError("needs an object with 'response' and 'answer'")
            if (choices := row.get("choices")) is not None and not isinstance(choices, list):
                raise ValueError(f"'choices' is a {type(choices).__name__}; give a list of option texts")
            row = {**row, "answer": answer_text(row["answer"]), "line": n}
            if choices:
                row["choices"] = [answer_text(c) for c in choices]
            rows.append(row)
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return rows, problems


def main(argv: list[str] | None = None) -> None:
    """CLI: scores a jsonl of predictions, prints accuracy / format rate / timeouts, writes per-row scores;
    unreadable lines are listed (file and line) on stderr and counted, every other row is scored."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Score a predictions file with the format + accuracy rewards."
    )
    parser.add_argument("preds", type=Path, help="jsonl with 'response' and 'answer' (optional 'choices') per row")
    parser.add_argument("--out", type=Path, default=None, help="per-row scores jsonl (default: <preds>.scores.jsonl)")
    parser.add_argument("--workers", type=int, default=2, help="scoring processes (0 = in this process)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="hard time limit per response, seconds")
    args = parser.parse_args(argv)
    rows, problems = read_predictions(args.preds)
    for message in problems[:20]:
        print(message, file=sys.stderr)
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more unreadable lines", file=sys.stderr)
    if not rows:
        listed = f" ({len(problems)} unreadable lines, listed above)" if problems else ""
        sys.exit(f"{args.preds}: no scorable rows{listed}")
    responses, golds, choices = ([r.get(k) for r in rows] for k in ("response", "answer", "choices"))
    scores = compute_rewards(responses, golds, choices, workers=args.workers, timeout_s=args.timeout_s)
    out = args.out or args.preds.with_suffix(".scores.jsonl")
    replaced = out.exists()
    with out.open("w") as f:
        for row, score in zip(rows, scores):
            record = {"id": row.get("id"), "line": row["line"], "extracted": extract_answer(row["response"]), **score}
            f.write(json.dumps(record) + "\n")
    print(f"rows       {len(scores)}")
    for key in ("accuracy", "format"):  # mean rewards
        print(f"{key:<11}{sum(s[key] for s in scores) / max(1, len(scores)):.4f}")
    print(f"timeouts   {sum(s['timed_out'] for s in scores)}")
    print(f"skipped    {len(problems)}" + (" unreadable lines (listed on stderr)" if problems else ""))
    print(f"scores  -> {out}" + (" (replaced the previous file)" if replaced else ""))


if __name__ == "__main__":
    main()
