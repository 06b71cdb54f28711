"""MMR1-SFT from the hub to a local folder that `sft.py --data` reads as published.

Downloads the data set repository (huggingface_hub.snapshot_download: `sft.json` and the image tar
partitions), extracts every tar partition into the same folder (image paths in `sft.json` are
relative to it), and checks that the first rows' images are there. Then train with
`--data <out>/sft.json`.

    python scripts/get_mmr1_sft.py --out data/mmr1-sft                     # download + extract
    python scripts/get_mmr1_sft.py --out data/mmr1-sft --no-download       # extract a folder you copied
    torchrun --nproc_per_node 8 sft.py --preset paper --model Qwen/Qwen2.5-VL-7B-Instruct --data data/mmr1-sft/sft.json
"""

from __future__ import annotations

import argparse
import tarfile
import zlib
from pathlib import Path


def extract_partitions(folder: Path) -> int:
    """Extracts every tar partition under `folder` (`*.tar`, `*.tar.gz`, `*.tgz`) into `folder`,
    once (a `<name>.done` marker beside each); returns how many were extracted now.

    A truncated or corrupt partition, or a member the "data" filter refuses, is a SystemExit of one
    line naming the partition and saying to re-download it (no marker: the next run extracts it again)."""
    done = 0
    for tar in sorted(p for p in folder.rglob("*") if p.name.endswith((".tar", ".tar.gz", ".tgz"))):
        marker = tar.with_name(tar.name + ".done")
        if marker.exists():
            continue
        print(f"extracting {tar.relative_to(folder)}", flush=True)
        try:
            with tarfile.open(tar) as archive:
                archive.extractall(folder, filter="data")  # no absolute paths or links out of the folder
        except tarfile.FilterError as e:  # a member the "data" filter refuses (absolute, outside, a device)
            raise SystemExit(
                f"error: {tar}: refused member ({type(e).__name__}: {e}); this partition is not as published: "
                f"delete {tar} and run this script again to re-download it"
            ) from e
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # truncated or corrupt (an interrupted download)
            raise SystemExit(
                f"error: {tar}: truncated or corrupt archive ({type(e).__name__}: {e}); delete {tar} and run this "
                "script again to re-download that partition (its extracted files are then rewritten)"
            ) from e
        marker.touch()
        done += 1
    return done


def missing_images(sft_json: Path, rows: int = 200) -> list[str]:
    """Image paths of the first `rows` rows of `sft_json` that do not exist relative to its folder."""
    from mmr1 import layouts

    missing = []
    for i, (_, row) in enumerate(layouts._json_array(sft_json)):
        if i >= rows:
            break
        for image in (row.get("images") or []) if isinstance(row, dict) else []:
            if isinstance(image, str) and not (sft_json.parent / image).exists():
                missing.append(image)
    return missing


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default="MMR1/MMR1-SFT", help="hub data set repository")
    parser.add_argument("--out", type=Path, required=True, help="local folder for sft.json and the images")
    parser.add_argument("--no-download", action="store_true", help="only extract and check a folder already there")
    args = parser.parse_args()
    if not args.no_download:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=args.repo, repo_type="dataset", local_dir=str(args.out))
    print(f"extracted {extract_partitions(args.out)} tar partitions in {args.out}")
    found = sorted(args.out.rglob("sft.json"))
    if not found:
        raise SystemExit(f"error: no sft.json under {args.out}")
    missing = missing_images(found[0])
    if missing:
        raise SystemExit(f"error: {len(missing)} images of the first rows of {found[0]} are missing, e.g. {missing[0]}")
    print(f"ready: --data {found[0]}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
