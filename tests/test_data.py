"""mmr1.data: loading rows from files, folders, splits and the toy parquet; bad rows named or skipped."""

import json
from pathlib import Path

import pytest

from data import toy
from mmr1 import config, data, prepare


def grid_image(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


def write_rows(path, rows):
    import datasets

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))


def image_file(tmp_path, name="img.png"):
    path = tmp_path / name
    grid_image().save(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_load_rows_files_folders_and_splits(tmp_path, suffix):
    img = image_file(tmp_path)
    rows = [{"id": str(i), "problem": f"<image>Q{i}", "answer": str(i), "images": [img]} for i in range(3)]
    folder = tmp_path / "set"
    folder.mkdir()
    write_rows(folder / f"train{suffix}", rows)
    write_rows(folder / f"val{suffix}", rows[:1])
    assert [r["answer"] for r in prepare.load_rows(str(folder / f"train{suffix}"), "rl")] == ["0", "1", "2"]
    assert len(prepare.load_rows(str(folder), "rl", split="train")) == 3
    assert len(prepare.load_rows(f"{folder}@val", "rl")) == 1
    with pytest.raises(FileNotFoundError, match="no test"):
        prepare.load_rows(f"{folder}@test", "rl")


def test_toy_parquet_loads(toy_dir):
    assert len(prepare.load_rows(f"{toy_dir / 'data' / 'rl'}@val", "rl")) == 24
    assert len(prepare.load_rows(f"{toy_dir / 'data' / 'sft'}@train", "sft")) == 96


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"problem": "<image>Q", "images": ["IMG"]}, "missing 'answer'"),
        ({"problem": "<image>Q", "answer": "1", "images": [{"bytes": b"not a png"}]}, "image 0 is unreadable"),
        ({"problem": "<image><image>Q", "answer": "1", "images": ["IMG"]}, "2 <image> markers but 1 images"),
    ],
)
def test_bad_rows_are_named_or_skipped(tmp_path, bad, message):
    img = image_file(tmp_path)
    good = {"id": "g", "problem": "<image>Q", "answer": "1", "images": [img]}
    bad = {"id": "b", **{k: ([img if x == "IMG" else x for x in v] if k == "images" else v) for k, v in bad.items()}}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad, default=lambda b: b.decode()) + "\n")
    if "bytes" in str(bad["images"][0]):  # jsonl cannot hold bytes: use parquet for that case
        path = tmp_path / "rows.parquet"
        write_rows(path, [dict(good, images=[{"bytes": open(img, "rb").read()}]), bad])
    where = rf"rows\.(jsonl line 2|parquet row 1) \(id=b\): {message}"
    # fields and image headers alike: found by the door, before any row is used
    with pytest.raises(config.BadRowError, match=where):
        prepare.load_rows(str(path), "rl")
    assert [r["id"] for r in prepare.load_rows(str(path), "rl", skip_bad_rows=True)] == ["g"]


# ---------------------------------------------------------------------------------------------
# Issue 20: MMR1-SFT as published, split hygiene, rows on disk
# ---------------------------------------------------------------------------------------------


def sharegpt_rows():
    """Rows in MMR1-SFT's published layout: `conversations` of `from` / `value`, relative image paths."""
    return [
        {
            "conversations": [
                {"from": "system", "value": "Think first."},
                {"from": "human", "value": "<image>What colour is top left?"},
                {"from": "gpt", "value": "<think>look</think><answer>\\boxed{red}</answer>"},
            ],
            "images": ["imgs/a.png"],
        },
        {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}], "images": []},
        {
            "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            "images": ["imgs/a.png"],
        },
    ]


def test_mmr1_sft_published_layout_reads_as_messages(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    image_file(tmp_path / "imgs", "a.png")
    (tmp_path / "sft.json").write_text(json.dumps(sharegpt_rows(), indent=1))
    monkeypatch.chdir(tmp_path / "imgs")  # image paths are relative to sft.json's folder, not the working directory
    rows = prepare.load_rows(str(tmp_path / "sft.json"), "sft")
    assert len(rows) == 3
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "<image>What colour is top left?"},
        {"role": "assistant", "content": "<think>look</think><answer>\\boxed{red}</answer>"},
    ]
    assert rows[0]["images"][0].size == (112, 112) and rows[1]["images"] == []
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant"] and rows[2]["messages"][1][
        "content"
    ] == "A"
    assert rows.undecoded(0)["images"] == [str(tmp_path / "imgs" / "a.png")]
    assert rows.where(2) == f"{tmp_path / 'sft.json'} row 2"


def test_sharegpt_bad_turns_are_bad_rows(tmp_path):
    good, bad = sharegpt_rows()[1], {"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}
    (tmp_path / "sft.json").write_text(json.dumps([good, bad]))
    with pytest.raises(config.BadRowError, match=r"sft\.json row 1 \(id=x\): conversation turn 0 is from 'robot'"):
        prepare.load_rows(str(tmp_path / "sft.json"), "sft")
    assert len(prepare.load_rows(str(tmp_path / "sft.json"), "sft", skip_bad_rows=True)) == 1
    (tmp_path / "broken.json").write_text('[{"a": 1}, {"b": ')
    with pytest.raises(config.BadRowError, match=r"broken\.json: not valid JSON at element 1 \(Expecting value\)$"):
        prepare.load_rows(str(tmp_path / "broken.json"), "sft")


def test_json_array_is_streamed_in_chunks_exactly(tmp_path):
    """The chunked reader gives json.load's elements and their raw text at any chunk boundary."""
    from mmr1 import layouts

    items = sharegpt_rows() + [{"t": 'ü ☃ "q" \\ end', "n": [1, 2.5, None]}]
    path = tmp_path / "chunks.json"
    path.write_text("  [\n" + " ,\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n ] \n")
    for chunk in (1, 3, 7, 64, 1 << 20):
        got = list(layouts._json_array(path, chunk=chunk))
        assert [v for _, v in got] == items and [json.loads(t) for t, _ in got] == items


def test_a_folder_uses_its_split_files_only(tmp_path):
    img = image_file(tmp_path)
    folder = tmp_path / "hub"
    folder.mkdir()
    rows = [{"id": str(i), "problem": f"<image>Q{i}", "answer": str(i), "images": [img]} for i in range(5)]
    write_rows(folder / "train-00000-of-00002.parquet", rows[:2])
    write_rows(folder / "train-00001-of-00002.parquet", rows[2:3])
    write_rows(folder / "validation-00000-of-00001.parquet", rows[3:4])
    write_rows(folder / "test.parquet", rows[4:])
    loaded = prepare.load_rows(str(folder), "rl")  # default split train: both shards, never validation / test
    assert [loaded[i]["id"] for i in range(len(loaded))] == ["0", "1", "2"]
    assert loaded.where(2) == f"{folder / 'train-00001-of-00002.parquet'} row 0"
    assert [r["id"] for r in prepare.load_rows(f"{folder}@val", "rl")] == ["3"]  # val finds validation
    only_eval = tmp_path / "eval_only"
    only_eval.mkdir()
    write_rows(only_eval / "val.parquet", rows[:1])
    write_rows(only_eval / "test.jsonl", rows[:1])
    with pytest.raises(FileNotFoundError, match=r"has no train\.parquet"):
        prepare.load_rows(str(only_eval), "rl")  # val / test are never trained on
    write_rows(folder / "train.jsonl", rows)
    with pytest.raises(FileNotFoundError) as error:
        prepare.load_rows(str(folder), "rl")
    assert str(error.value) == (
        f"{folder} has 3 files for split 'train' (train-00000-of-00002.parquet, train-00001-of-00002.parquet, "
        "train.jsonl); keep one (or one set of shards) and move the others away"
    )


def test_rows_stay_on_disk_until_indexed(tmp_path):
    """Opening decodes no image (a parquet row holds raw bytes until indexed); the JSON cache is built once."""
    img = image_file(tmp_path)
    rows = [
        {"id": str(i), "problem": "<image>Q", "answer": "1", "images": [{"bytes": open(img, "rb").read()}]}
        for i in range(4)
    ]
    write_rows(tmp_path / "rl.parquet", rows)
    loaded = prepare.load_rows(str(tmp_path / "rl.parquet"), "rl")
    raw = loaded.undecoded(3)  # the door's table holds no image bytes: they are read from the source
    assert isinstance(raw["images"][0]["bytes"], bytes) and loaded.table.column("index").to_pylist() == [0, 1, 2, 3]
    assert loaded[3]["images"][0].size == (112, 112)
    (tmp_path / "sft.json").write_text(json.dumps(sharegpt_rows()[1:2] * 3))
    prepare.load_rows(str(tmp_path / "sft.json"), "sft")
    import datasets

    caches = sorted((Path(datasets.config.HF_DATASETS_CACHE) / "mmr1_rows").glob("sft-sft-*.arrow"))
    mtimes = {p: p.stat().st_mtime_ns for p in caches}
    assert len(prepare.load_rows(str(tmp_path / "sft.json"), "sft")) == 3
    assert {p: p.stat().st_mtime_ns for p in caches} == mtimes  # reused, not rebuilt


def test_get_mmr1_sft_extracts_the_partitions_next_to_sft_json(tmp_path):
    """scripts/get_mmr1_sft.py after the download: tar partitions extracted beside sft.json, which then trains as is."""
    import importlib.util
    import tarfile

    spec = importlib.util.spec_from_file_location(
        "get_mmr1_sft", Path(data.__file__).parent.parent / "scripts" / "get_mmr1_sft.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    staging = tmp_path / "staging"
    (staging / "imgs").mkdir(parents=True)
    image_file(staging / "imgs", "a.png")
    out = tmp_path / "mmr1-sft"
    out.mkdir()
    with tarfile.open(out / "images_part_0.tar", "w") as archive:
        archive.add(staging / "imgs", arcname="imgs")
    (out / "sft.json").write_text(json.dumps(sharegpt_rows()))
    assert script.missing_images(out / "sft.json") == ["imgs/a.png", "imgs/a.png"]
    assert script.extract_partitions(out) == 1 and script.extract_partitions(out) == 0  # once
    assert script.missing_images(out / "sft.json") == []
    assert prepare.load_rows(str(out / "sft.json"), "sft")[2]["images"][0].size == (112, 112)
