"""Benchmark evaluation: MathVerse, MathVista, MathVision, LogicVista, ChartQA with their own rules.

    python eval.py                                        # toy: SFT and GRPO toy checkpoints on the toy test split
    python eval.py --model runs/mmr1-7b-grpo/final --benchmarks mathverse,mathvista,mathvision,logicvista,chartqa
    torchrun --nproc_per_node 8 eval.py --model M --max-new-tokens 4096
    python eval.py --model M --benchmarks mathvista --bench-data mathvista=local/mathvista.parquet --limit 50

Every answer is extracted with reward.extract_answer and compared with reward.is_equivalent plus the
benchmark's own rule (no LLM judge). Writes <output-dir>/<model>/<benchmark>.jsonl (one line per
sample) and results.md / results.json with the paper's rows beside the evaluated model.
"""

from __future__ import annotations

import dataclasses
import difflib
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


# Hub id, config, split of each benchmark (PAPER.md, "Benchmark data")
HUB = {
    "mathverse": ("AI4Math/MathVerse", "testmini", "testmini"),
    "mathvista": ("AI4Math/MathVista", None, "testmini"),
    "mathvision": ("MathLLMs/MathVision", None, "test"),
    "logicvista": ("lscpku/LogicVista", None, "test"),
    "chartqa": ("lmms-lab/ChartQA", None, "test"),
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


# ---------------------------------------------------------------------------------------------
# Rows of each benchmark -> prompt rows (problem, images), and the breakdown key
# ---------------------------------------------------------------------------------------------


def options_text(choices: list[str]) -> str:
    """'\\nChoices:\\n(A) x\\n(B) y' for a list of option texts."""
    return "\nChoices:\n" + "\n".join(f"({reward.LETTERS[i]}) {c}" for i, c in enumerate(choices))


def to_prompt_row(benchmark: str, row: dict) -> dict:
    """The RL-format row (problem, images) the engine generates from; raises ValueError if unusable."""
    if benchmark == "toy":
        return row
    image = {"mathvista": "decoded_image", "mathvision": "decoded_image"}.get(benchmark, "image")
    image = row.get(image) if row.get(image) is not None else row.get("image")
    if image is None:
        raise ValueError("no image")
    question = row.get("question")
    if not question or row.get("answer") in (None, ""):
        raise ValueError("missing question or answer")
    if benchmark == "mathvista" and row.get("choices"):
        question += options_text(list(row["choices"]))
    if benchmark == "mathvision" and row.get("options"):
        question += options_text(list(row["options"]))
    return {"problem": "<image>" + question.replace("<image>", "").strip(), "images": [image]}


def mathverse_options(question: str) -> list[str]:
    """Option texts of a MathVerse question, whose choices live in its text after "Choices:" as
    lines like "A:30°" / "(B) 40" / "C. 50"; [] when the question lists none."""
    _, found, tail = question.partition("Choices:")
    if not found:
        return []
    options = re.findall(r"^\s*\(?([A-E])\s*[:.)]\s*(.*?)\s*$", tail, flags=re.MULTILINE)
    letters = [letter for letter, _ in options]
    return [text for _, text in options] if letters == list(reward.LETTERS[: len(letters)]) else []


def breakdown_key(benchmark: str, row: dict) -> str:
    """The sub-category a row is reported under (MathVerse version, MathVista type, ChartQA split)."""
    key = {"mathverse": "problem_version", "mathvista": "question_type", "chartqa": "type", "toy": "family"}.get(
        benchmark
    )
    return str(row.get(key, "all")) if key else "all"


# ---------------------------------------------------------------------------------------------
# Scoring rules
# ---------------------------------------------------------------------------------------------


def most_similar_option(pred: str, choices: list[str]) -> int | None:
    """Index of the option whose text is most similar to pred (difflib ratio on lower-cased,
    whitespace-normalised text); None if pred is empty or nothing is similar at all."""
    if not pred or not choices:
        return None
    norm = [reward.normalise_text(c) for c in choices]
    p = reward.normalise_text(pred)
    ratios = [difflib.SequenceMatcher(None, p, c).ratio() for c in norm]
    best = max(range(len(choices)), key=lambda i: ratios[i])
    return best if ratios[best] > 0 else None


def chosen_option(pred: str | None, choices: list[str]) -> int | None:
    """The option a multiple-choice prediction picks: its letter, else its exact option text,
    else the most similar option text."""
    if pred is None:
        return None
    letter = reward.choice_letter(pred, len(choices))
    if letter is not None:
        return reward.LETTERS.index(letter)
    texts = [reward.normalise_text(c) for c in choices]
    if reward.normalise_text(pred) in texts:
        return texts.index(reward.normalise_text(pred))
    return most_similar_option(pred, choices)


def letters_in(text: str | None) -> set[str]:
    """The set of option letters named in an answer: 'A, C', 'AC', '(A) and (C)' -> {'A', 'C'}."""
    if not text:
        return set()
    cleaned = reward.clean_answer(text)
    if re.fullmatch(r"[A-Ea-e]{1,5}", cleaned.replace(" ", "")):
        return set(cleaned.replace(" ", "").upper())
    return set(re.findall(r"(?<![A-Za-z])([A-E])(?![A-Za-z])", cleaned))


def parse_float(text: str) -> float | None:
    """A number from text ('1,234', '12.5', '45%' -> 0.45 as ChartQA reads it), else None."""
    s = reward.clean_answer(text).replace(",", "")
    try:
        return float(s.rstrip("%")) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def chartqa_relaxed(pred: str, gold: str) -> bool:
    """ChartQA relaxed accuracy: 5% relative tolerance for a non-zero numeric target, else
    case-insensitive exact match."""
    p, g = parse_float(pred), parse_float(gold)
    if p is not None and g is not None and g != 0:
        return abs(p - g) / abs(g) <= 0.05
    return reward.normalise_text(pred) == reward.normalise_text(gold)


def score_answer(benchmark: str, response: str, row: dict) -> bool:
    """Whether `response` answers `row` (in the benchmark's own column layout) correctly.

    benchmark: mathverse, mathvista, mathvision, logicvista, chartqa or toy.
    """
    pred = reward.extract_answer(response)
    gold = str(row["answer"]).strip()
    if pred is None:
        return False
    if benchmark == "toy":
        return reward.is_equivalent(pred, gold, row.get("choices"))
    if benchmark == "mathverse":
        if row.get("question_type") == "multi-choice":  # gold is a letter; options live in the text
            options = mathverse_options(row.get("question", ""))
            if options:  # the letter, or the option text mapped to its letter (as for the other benchmarks)
                picked = chosen_option(pred, options)
                return picked is not None and reward.LETTERS[picked] == reward.choice_letter(gold)
            return reward.choice_letter(pred) == reward.choice_letter(gold)
        return reward.is_equivalent(pred, gold)
    if benchmark == "mathvista":
        if row.get("question_type") == "multi_choice":  # compare option TEXT
            choices = list(row["choices"])
            picked = chosen_option(pred, choices)
            return picked is not None and reward.normalise_text(choices[picked]) == reward.normalise_text(gold)
        kind = row.get("answer_type")
        value = parse_float(pred.rstrip("%")) if kind in ("integer", "float") else None
        if kind == "integer":
            return value is not None and value == int(float(gold))
        if kind == "float":
            digits = int(float(row.get("precision") or 0))  # stored as a float, e.g. 1.0
            return value is not None and round(value, digits) == round(float(gold), digits)
        if kind == "list":
            return re.sub(r"\s", "", pred) == re.sub(r"\s", "", gold)
        return reward.normalise_text(pred) == reward.normalise_text(gold)
    if benchmark == "mathvision":
        options = list(row.get("options") or [])
        if options:  # correct if the letter or the option text matches the gold letter / its text
            picked = chosen_option(pred, options)
            gold_index = reward.LETTERS.index(gold.upper()) if len(gold) == 1 and gold.isalpha() else None
            if gold_index is None:
                return reward.is_equivalent(pred, gold)
            return picked == gold_index or reward.is_equivalent(pred, options[gold_index])
        return reward.is_equivalent(pred, gold)
    if benchmark == "logicvista":
        return letters_in(pred) == letters_in(gold) and bool(letters_in(gold))
    if benchmark == "chartqa":
        return chartqa_relaxed(pred, gold)
    raise ValueError(f"unknown benchmark {benchmark!r}; choose from {BENCHMARKS}")


# ---------------------------------------------------------------------------------------------
# Loading and generation
# ---------------------------------------------------------------------------------------------


def load_benchmark(name: str, override: str | None, limit: int) -> list[dict]:
    """Raw rows of a benchmark: a local parquet/jsonl override, or its hub id and split."""
    import datasets

    if override:
        fmt = "parquet" if override.endswith(".parquet") else "json"
        ds = datasets.load_dataset(fmt, data_files=override, split="train")
    elif name == "toy":
        ds = datasets.load_dataset("parquet", data_files=str(toy.TOY_DATA_DIR / "rl" / "test.parquet"), split="train")
    else:
        hub_id, subset, split = HUB[name]
        ds = datasets.load_dataset(hub_id, subset, split=split)
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
                    "group": breakdown_key(name, row),
                }
            )
        bar.update(len(part) * d.world_size)
    bar.close()
    records = dist.all_gather_list(records[:n_real], d)
    return records, bad


def summarise(records: list[dict]) -> dict:
    """{'accuracy': %, 'n': rows, 'groups': {group: %}} of one benchmark's records."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r["correct"])
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "accuracy": pct([r["correct"] for r in records]),
        "n": len(records),
        "groups": {g: pct(v) for g, v in sorted(groups.items())},
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


def run_name(model: str) -> str:
    """The folder a model's per-sample files go to: its folder name, or its run's for a checkpoint
    folder (runs/x/final -> x, runs/x/step-100 -> x-step-100)."""
    path = Path(model)
    if path.name == "final":
        return path.parent.name
    return f"{path.parent.name}-{path.name}" if path.name.startswith("step-") else path.name


def make_engine(cfg: EvalConfig, path: str, model, processor, d: dist.Dist):
    """The engine that answers the benchmarks for the checkpoint at `path`; vLLM without sleep mode
    (nothing trains beside it, and vLLM allows one sleep-mode allocator per process, which a second
    model of `--model a,b` would trip)."""
    return rollout.make_engine(
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
        sleep_mode=False,
    )


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
        engine = make_engine(cfg, path, model, processor, d)
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
                groups = ", ".join(f"{g} {v:.1f}" for g, v in s["groups"].items())
                print(f"[eval] {label} {name}: {s['accuracy']:.1f}% of {s['n']} ({groups}); {len(bad)} skipped")
        engine.close()  # frees vLLM before the next model's engine starts
        del model, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if d.master:
        table = results_table(results, names, with_paper="toy" not in names)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "results.md").write_text(table + "\n")
        (Path(cfg.output_dir) / "results.json").write_text(
            json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2)
        )
        print(table)
    dist.cleanup_distributed()


if __name__ == "__main__":
    main()
