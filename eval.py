"""Benchmark evaluation: MathVerse, MathVista, MathVision, LogicVista, ChartQA with their own rules.

    python eval.py                                        # toy: SFT and GRPO toy checkpoints on the toy test split
    python eval.py --model runs/mmr1-7b-grpo/final --benchmarks mathverse,mathvista,mathvision,logicvista,chartqa
    torchrun --nproc_per_node 8 eval.py --model M --max-new-tokens 4096
    python eval.py --model M --benchmarks mathvista --bench-data mathvista=local/mathvista.parquet --limit 50
    python eval.py --compare-official runs/eval          # a finished run's verdicts beside exact match

Every answer is extracted with reward.extract_answer and scored by its benchmark's official rule
(score_answer; docs/eval.md) in worker processes with a hard limit per answer (SCORE_TIMEOUT_S). Writes
<output-dir>/<model>/<benchmark>.jsonl (one line per sample) and results.md / results.json: the paper's
rows beside the evaluated models, and each benchmark's breakdowns (its registry entry).

Departures from the official scorers (no LLM judge or extractor; the most-similar-option fallback for MathVista
only; exact MathVista integers; its `query` hint in free-form prompts): docs/eval.md, case by case.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import reward
from data import toy
from mmr1 import benchmark_rules, benchmarks, chat, config, dist, guards, modeling, rollout
from mmr1.config import field


@dataclass
class EvalConfig:
    """Scores a model on the five benchmarks of the paper (or the toy test split by default)."""

    model: str = field("", "comma-separated hub ids or local folders (default: the toy SFT and GRPO checkpoints)")
    benchmarks: str = field(
        ",".join(benchmarks.PAPER_BENCHMARKS), "comma-separated names from mmr1/benchmarks.py's registry (BENCHMARKS)"
    )
    bench_data: str = field("", "local overrides, name=path[,name=path]: parquet/jsonl in the benchmark's columns")
    output_dir: str = field("runs/eval", "where per-sample jsonl files and the results table go")
    toy: str = field(
        "default", toy.VARIANT_HELP + " (with --model: those models on its test split)", choices=list(toy.VARIANTS)
    )
    engine: str = field("auto", "generation engine: vllm (GPU), hf, or auto", choices=["auto", "hf", "vllm"])
    temperature: float = field(0.0, "sampling temperature (0 = greedy)", at_least=0.0)
    max_new_tokens: int = field(4096, "response token limit (as RL trains: 4096; the toy uses 64)", at_least=1)
    max_prompt_length: int = field(4096, "prompt token limit (vLLM context = prompt + response)", at_least=1)
    limit: int = field(0, "evaluate only the first N rows of each benchmark (0 = all)", at_least=0)
    batch_size: int = field(32, "prompts per generation call", at_least=1)
    min_pixels: int = field(7056, "images are resized to at least this many pixels", at_least=1)
    max_pixels: int = field(1048576, "images are resized to at most this many pixels", at_least=1)
    gpu_memory_utilization: float = field(0.75, "vLLM's share of GPU memory", above=0.0, at_most=1.0)
    seed: int = field(0, "sampling seed", at_least=0)
    compare_official: str = field(
        "",
        "instead of evaluating: per file of an earlier run (<output-dir>/<model>/<benchmark>.jsonl or a folder of "
        "them), how many verdicts differ from a strict exact-match reading; prints and exits",
    )


# The paper's rows, for comparison in the results table
PAPER_ROWS = {
    "Qwen2.5-VL-7B (paper)": dict(mathverse=50.4, mathvista=69.3, mathvision=28.7, logicvista=44.0, chartqa=82.4),
    "MMR1-7B (paper)": dict(mathverse=55.4, mathvista=72.0, mathvision=31.8, logicvista=48.9, chartqa=83.7),
}

# --- Generation and scoring ---

score_answer = benchmarks.score_answer  # eval.score_answer(benchmark, response, row): the one scoring entry point

SCORE_WORKERS = 2  # scoring processes per rank (reward.RewardPool, as training's rewards)
SCORE_TIMEOUT_S = 10.0  # hard limit per answer: one pathological prediction cannot hang a benchmark run


def scoring_pool() -> reward.RewardPool:
    """Worker processes scoring answers by the benchmarks' rules (benchmarks.score_job) under SCORE_TIMEOUT_S."""
    return reward.RewardPool(SCORE_WORKERS, SCORE_TIMEOUT_S, benchmarks.score_job, benchmarks.timed_out_job)


def score_outputs(name: str, part: list[dict], outs: list, pool: reward.RewardPool) -> list[dict]:
    """{"correct", "timed_out"} of each generated answer against its prompt's benchmark row, in the pool
    (sent without the image columns: no rule reads them)."""
    rows = [{k: v for k, v in p["benchmark_row"].items() if k not in benchmarks.IMAGE_COLUMNS} for p in part]
    return pool.map([{"benchmark": name, "response": out.text, "row": row} for row, out in zip(rows, outs)])


def evaluate_benchmark(engine, name: str, raw: list[dict], cfg: EvalConfig, d: dist.Dist, pool):
    """Generates for every usable row (sharded over ranks) and scores it in `pool` (scoring_pool); returns
    (records, bad). Asked under the registry entry's system prompt (the paper's Table 8; none for the toy),
    the question and options as the user turn."""
    usable, bad = benchmarks.prompt_rows(name, raw, cfg.min_pixels, cfg.max_pixels)
    padded, n_real = dist.shard(usable, d)
    engine.prompt_format = chat.PromptFormat(system=benchmarks.BENCHMARKS[name].system_prompt)
    records = []
    sampling = rollout.Sampling(cfg.temperature, 1.0, cfg.max_new_tokens, dist.derive_seed(cfg.seed, "eval"))
    bar = tqdm(total=len(usable), disable=not d.master, desc=name, leave=False)
    for s in range(0, len(padded), cfg.batch_size):
        part = padded[s : s + cfg.batch_size]
        outs = engine.generate(part, 1, sampling)
        for prompt, out, scored in zip(part, outs, score_outputs(name, part, outs, pool)):
            row = prompt["benchmark_row"]
            records.append(
                {
                    "benchmark": name,
                    "id": prompt["id"],
                    "response": out.text,
                    "extracted": reward.extract_answer(out.text),
                    "gold": str(row["answer"]),
                    **scored,  # correct, timed_out
                    "groups": benchmarks.breakdown(name, row),
                    "options": benchmark_rules.row_options(name, row),  # for --compare-official's letters
                }
            )
        bar.update(len(part) * d.world_size)
    bar.close()
    return dist.all_gather_list(records[:n_real], d), bad


NO_USABLE_ROWS = "no usable rows"  # a benchmark's cell when every row was skipped: not scored, not 0.0


def summarise(records: list[dict]) -> dict:
    """{'accuracy': %, 'n': rows, 'timed_out': rows, 'breakdown': {column: {value: {'accuracy': %, 'n': rows}}}}
    of one benchmark's records (the breakdown columns its rows have); accuracy None (null in
    results.json, "no usable rows" in the table) when no row was usable, never 0.0."""
    if not records:
        return {"accuracy": None, "n": 0, "breakdown": {}, "note": NO_USABLE_ROWS}
    pct = lambda xs: 100.0 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    by: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        for column, value in r.get("groups", {}).items():
            by.setdefault(column, {}).setdefault(value, []).append(r["correct"])
    return {
        "accuracy": pct([r["correct"] for r in records]),
        "n": len(records),
        "timed_out": sum(bool(r.get("timed_out")) for r in records),  # scored wrong: past SCORE_TIMEOUT_S
        "breakdown": {
            column: {v: {"accuracy": pct(xs), "n": len(xs)} for v, xs in sorted(values.items())}
            for column, values in by.items()
        },
    }


def summary_line(s: dict) -> str:
    """One benchmark's summarise() (with "skipped") as the progress line eval.py prints."""
    if s["accuracy"] is None:
        return f"{NO_USABLE_ROWS} ({s['skipped']} skipped); not scored"
    groups = "; ".join(
        f"{column}: " + ", ".join(f"{v} {g['accuracy']:.1f}" for v, g in values.items())
        for column, values in s["breakdown"].items()
    )
    late = f"; {s['timed_out']} scored wrong after the {SCORE_TIMEOUT_S:.0f}s limit" if s["timed_out"] else ""
    return f"{s['accuracy']:.1f}% of {s['n']} ({groups}); {s['skipped']} skipped{late}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its `| --- |` rule, then one line per row of cells."""
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def results_table(results: dict[str, dict[str, dict]], names: list[str], with_paper: bool) -> str:
    """Markdown table: one row per evaluated model (plus the paper's rows), one column per benchmark."""
    rows = {m: {b: r[b]["accuracy"] for b in names if b in r} for m, r in results.items()}
    cell = lambda v: NO_USABLE_ROWS if v is None else f"{v:.1f}"  # noqa: E731
    if with_paper:
        rows.update(PAPER_ROWS)
    body = []
    for model, scores in rows.items():
        cells = [model, *(cell(scores[b]) if b in scores else "-" for b in names)]
        if len(names) > 1:  # the average, over complete rows only
            complete = all(scores.get(b) is not None for b in names)
            cells.append(f"{sum(scores[b] for b in names) / len(names):.1f}" if complete else "-")
        body.append(cells)
    return "\n".join(markdown_table(["model", *names, *(["avg"] if len(names) > 1 else [])], body))


def breakdown_tables(results: dict[str, dict[str, dict]], names: list[str]) -> str:
    """Markdown tables of the per-category scores: one per benchmark and breakdown column, one row per
    model, one column per category (its row count in the header)."""
    blocks = []
    for name in names:
        columns = {c: v for r in results.values() if name in r for c, v in r[name].get("breakdown", {}).items()}
        for column, values in columns.items():
            body = []
            for model, r in results.items():
                scores = r.get(name, {}).get("breakdown", {}).get(column, {})
                body.append([model, *(f"{scores[v]['accuracy']:.1f}" if v in scores else "-" for v in values)])
            header = ["model", *(f"{v} (n={s['n']})" for v, s in values.items())]
            blocks.append("\n".join([f"{name} by {column}:", "", *markdown_table(header, body)]))
    return "\n\n".join(blocks)


def run_name(model: str) -> str:
    """The folder a model's per-sample files go to: its folder name, or its run's for a checkpoint
    folder (runs/x/final -> x, runs/x/step-100 -> x-step-100)."""
    path = Path(model)
    if path.name == "final":
        return path.parent.name
    return f"{path.parent.name}-{path.name}" if path.name.startswith("step-") else path.name


MODEL_RECORD = "model.json"  # in each model's folder: the --model it holds the per-sample files of


def output_folders(models: list[str], output_dir: str | Path) -> dict[str, Path]:
    """{model: its folder under output_dir}, never shared: run_name if free, else with more of the path in
    front (exp1/toy/final, exp2/toy/final -> exp1-toy, exp2-toy), else numbered. Free: not given to another
    model by this call, and its MODEL_RECORD (an earlier evaluation's) names no other model."""
    folders: dict[str, Path] = {}
    for model in models:
        path = Path(model)
        used = 2 if path.name == "final" or path.name.startswith("step-") else 1  # the parts run_name reads
        above = [p for p in path.parts[: len(path.parts) - used] if p not in ("/", ".", "..")]
        base = run_name(model) or "model"
        candidates = [base] + ["-".join(above[-k:] + [base]) for k in range(1, len(above) + 1)]
        numbered = (f"{candidates[-1]}-{i}" for i in itertools.count(2))
        tried = (Path(output_dir) / name for name in itertools.chain(candidates, numbered))
        key = model_key(model)
        folders[model] = next(f for f in tried if f not in folders.values() and model_record(f) in (None, key))
    return folders


def model_record(folder: Path) -> str | None:
    """The model a folder's MODEL_RECORD names, None when there is none; InputError (one line naming the
    file) when it is no JSON object naming a model, so no evaluation writes into a folder it cannot tell is its own."""
    record = folder / MODEL_RECORD
    if not record.exists():
        return None
    holder, problem = None, 'not an object naming a model, e.g. {"model": "runs/x/final"}'
    try:
        holder = config.loads_json(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # a folder, not UTF-8, empty, cut, too deep
        problem = config.first_line(e)
    if not isinstance(holder, dict) or not isinstance(holder.get("model"), str):
        raise config.InputError(
            f"{record}: unreadable ({problem}); it names the model whose per-sample files {folder} holds: "
            "fix or delete it, or give another --output-dir"
        )
    return holder["model"]


def model_key(model: str) -> str:
    """How MODEL_RECORD names a model: a local folder by its absolute path, a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def write_samples(folder: Path, model: str, name: str, records: list[dict]) -> None:
    """folder/<benchmark>.jsonl (one line per sample) and folder/MODEL_RECORD naming the model."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, lines in ((MODEL_RECORD, [{"model": model_key(model)}]), (f"{name}.jsonl", records)):
        with config.atomic_file(folder / file) as f:  # whole or absent: a kill or a full disk leaves no half file
            f.writelines(json.dumps(r) + "\n" for r in lines)


def make_engine(cfg: EvalConfig, path: str, model, processor, d: dist.Dist):
    """The engine answering the benchmarks for the checkpoint at `path`; vLLM without sleep mode (nothing
    trains beside it, and a second model of `--model a,b` would trip vLLM's one sleep-mode allocator)."""
    return rollout.make_engine(
        cfg.engine, model, processor, d, model_path=path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        batch_size=cfg.batch_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_new_tokens + cfg.max_prompt_length, sleep_mode=False,
    )  # fmt: skip


def models_and_benchmarks(cfg: EvalConfig) -> tuple[dict[str, str], list[str]]:
    """({label: checkpoint}, benchmark names) of the run. --model alone: those models on --benchmarks;
    no --model: the toy's SFT and GRPO checkpoints on its test split; --toy NAME with --model: those
    models on that toy's test split. Refuses (one `error:` line) a benchmark the registry lacks."""
    models = {m: m for m in cfg.model.split(",") if m}
    if cfg.model and cfg.toy == "default":
        names = [b.strip() for b in cfg.benchmarks.split(",") if b.strip()]
        unknown = [n for n in names if n not in benchmarks.BENCHMARKS]
        if unknown:
            config.fail(f"--benchmarks: unknown {', '.join(unknown)}; choose from {', '.join(benchmarks.BENCHMARKS)}")
        return models, names
    toy.ensure_toy(variant=cfg.toy)
    if not cfg.model:  # compare the SFT and GRPO toy checkpoints
        runs = [toy.run_dir(stage, cfg.toy) for stage in ("sft", "grpo")]
        models = {r.name: str(r / "final") for r in runs if (r / "final").exists()}
        if not models:
            flag = "" if cfg.toy == "default" else f" --toy {cfg.toy}"
            config.fail(f"no toy checkpoints: run `python sft.py{flag}` (and `python grpo.py{flag}`) first")
    cfg.bench_data = cfg.bench_data or f"toy={toy.VARIANT_DATA_DIRS[cfg.toy] / 'rl' / 'test.parquet'}"
    cfg.max_new_tokens, cfg.min_pixels, cfg.max_pixels = min(cfg.max_new_tokens, 64), 3136, 50176
    return models, ["toy"]


def bench_files(bench_data: str, names: list[str]) -> dict[str, str]:
    """--bench-data as {benchmark: file}; refuses (one `error:` line) an entry that is not name=path, a
    name the registry lacks or that is not evaluated (a misspelt name would otherwise send the run to
    the hub copy), a name given twice, and a file that is not there."""
    files: dict[str, str] = {}
    for entry in (e.strip() for e in bench_data.split(",") if e.strip()):
        name, eq, path = entry.partition("=")
        if not eq or not name or not path:
            config.fail(f"--bench-data {entry!r}: give name=path (e.g. mathvista=local/mv.parquet)")
        if name not in benchmarks.BENCHMARKS:
            config.fail(
                f"--bench-data {entry}: unknown benchmark {name!r}; choose from {', '.join(benchmarks.BENCHMARKS)}"
            )
        if name not in names:
            config.fail(f"--bench-data {entry}: {name} is not evaluated (--benchmarks {','.join(names)})")
        if name in files:
            config.fail(f"--bench-data: {name} is given twice")
        if not Path(path).is_file():
            config.fail(f"--bench-data {entry}: " + ("a folder, not a file" if Path(path).is_dir() else "no such file"))
        files[name] = path
    return files


# --- --compare-official: a finished run's verdicts beside a strict exact-match reading ---

SAMPLE_FIELDS = ("extracted", "gold", "correct")  # what the comparison reads in each per-sample line


def compare_official(path: str, examples: int = 3) -> str:
    """Markdown: one table row per per-sample file (`path`, or each *.jsonl under it; none: InputError):
    n, accuracy by the benchmark's rule, by strict exact match (benchmark_rules.strict_correct), and how
    many verdicts differ each way; then up to `examples` answers per file credited by the rule only. The
    gap bounds what the rules' leniency (equivalence, units, rounding, tolerance, the most-similar
    option) added. A line that is no JSON object or lacks SAMPLE_FIELDS: BadRowError naming it."""
    target = Path(path)
    files = [target] if target.is_file() else sorted(target.rglob("*.jsonl")) if target.is_dir() else []
    if not files:
        where = "no *.jsonl file in this folder" if target.is_dir() else "no such file or folder"
        raise config.InputError(f"--compare-official {path}: {where}")
    rows, shown, no_options = [], [], 0
    for file in files:
        records = benchmarks.jsonl_rows(file)
        for line, record in enumerate(records, 1):
            missing = [k for k in SAMPLE_FIELDS if k not in record]
            if missing:
                raise config.BadRowError(f"{file} record {line}: no {missing[0]!r}; give a per-sample file of eval.py")
        rule = [bool(r["correct"]) for r in records]
        exact = [benchmark_rules.strict_correct(r["extracted"], str(r["gold"]), r.get("options")) for r in records]
        here_only = [r for r, right, strict in zip(records, rule, exact) if right and not strict]
        exact_only = sum(strict and not right for right, strict in zip(rule, exact))
        no_options += sum("options" not in r for r in records)
        pct = [f"{100 * sum(v) / len(records):.1f}" if records else "-" for v in (rule, exact)]
        rows.append([str(file), str(len(records)), *pct, str(len(here_only)), str(exact_only)])
        shown += [
            f"- {file} id={r.get('id', '?')}: answer {r['extracted']!r}, gold {r['gold']!r}"
            for r in here_only[:examples]
        ]
    notes = ["", f"Right by the rule only (up to {examples} per file):", *shown] if shown else []
    if no_options:
        notes.append(f"({no_options} lines carry no `options`: a letter answer to a gold option text counts as wrong)")
    header = ["file", "n", "accuracy", "exact match", "right here only", "right by exact match only"]
    return "\n".join(markdown_table(header, rows) + notes)


def main() -> None:
    cfg = config.parse_config(EvalConfig)
    if cfg.compare_official:  # a report on an earlier run: nothing is loaded or generated
        print(compare_official(cfg.compare_official))
        return
    models, names = models_and_benchmarks(cfg)
    files = bench_files(cfg.bench_data, names)
    d = dist.setup_distributed(cfg.seed)
    for path in models.values():
        guards.check_model_dir(path)
    guards.lock_output_dir(cfg.output_dir, d.master)  # writable before anything is generated; one eval per folder
    files.setdefault("toy", str(toy.TOY_DATA_DIR / "rl" / "test.parquet"))  # --benchmarks toy: the toy's test split
    raw = {n: benchmarks.load_benchmark(n, files.get(n), cfg.limit) for n in names}

    results: dict[str, dict[str, dict]] = {}
    folders = output_folders(list(models), cfg.output_dir)  # one per model, never shared
    pool = scoring_pool()  # scoring with a hard limit per answer, as training's rewards
    for label, path in models.items():
        processor = modeling.load_processor(path, cfg.min_pixels, cfg.max_pixels)
        model = None if cfg.engine == "vllm" else modeling.shard_model(modeling.load_model(path, d.device), d).eval()
        engine = make_engine(cfg, path, model, processor, d)
        results[label] = {}
        for name in names:
            records, bad = evaluate_benchmark(engine, name, raw[name], cfg, d, pool)
            if d.master:
                write_samples(folders[label], label, name, records)
                for line in bad:
                    print(f"[eval] skipped malformed {line}")
                s = results[label][name] = {**summarise(records), "skipped": len(bad)}
                print(f"[eval] {label} {name}: {summary_line(s)}")
        engine.close()  # frees vLLM before the next model's engine starts
        del model, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    pool.close()
    if d.master:
        table = results_table(results, names, with_paper="toy" not in names) + "\n\n" + breakdown_tables(results, names)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2))
        print(table)
    dist.cleanup_distributed()


if __name__ == "__main__":
    config.exit_on_input_error(main)
