"""mmr1.data: loading rows from files, folders, splits and the toy parquet; bad rows named or skipped."""

import json

import pytest

from data import toy
from mmr1 import config, data


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
    assert [r["answer"] for r in data.load_rows(str(folder / f"train{suffix}"), "rl")] == ["0", "1", "2"]
    assert len(data.load_rows(str(folder), "rl", split="train")) == 3
    assert len(data.load_rows(f"{folder}@val", "rl")) == 1
    with pytest.raises(FileNotFoundError, match="no test"):
        data.load_rows(f"{folder}@test", "rl")


def test_toy_parquet_loads(toy_dir):
    assert len(data.load_rows(f"{toy_dir / 'data' / 'rl'}@val", "rl")) == 24
    assert len(data.load_rows(f"{toy_dir / 'data' / 'sft'}@train", "sft")) == 96


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
    if "unreadable" not in message:  # a field problem: found when the data is opened
        with pytest.raises(config.BadRowError, match=where):
            data.load_rows(str(path), "rl")
        assert [r["id"] for r in data.load_rows(str(path), "rl", skip_bad_rows=True)] == ["g"]
        return
    # an image problem: found when the row is first used (images decode per batch, not at load)
    rows = data.load_rows(str(path), "rl")
    assert rows[0]["id"] == "g"
    with pytest.raises(config.BadRowError, match=where):
        rows[1]
    rows = data.load_rows(str(path), "rl", skip_bad_rows=True)
    assert [r["id"] for r in rows] == ["g", "g"] and rows.skipped == 1  # replaced by the next usable row
