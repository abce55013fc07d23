"""The cost of a source's listing: what every run pays to know what a folder holds (issue 35).

    python -m benchmarks.listing --files 1000000     # 1000 class folders of 1000 empty .jpg files in /tmp

A folder source is listed once per run (`RunContext.source`, then `RunContext.listing`): one `stat` per
image for its size and mtime_ns, sorted, and the sha256 of every (id, size, mtime_ns) row: the digest that
is the source's identity in the embed key. Measured on a generated tree of empty files (a stat does not
read the file, so the size of the images changes nothing), in ImageNet's shape (class folders), from
warm metadata caches (the tree was just written; a cold first listing on a network filesystem is
slower and bounded by its metadata server, not by this code). Reported: `list_s` (`folder_source`:
walk + stat + records), `digest_s` (`io.listing.listing_of`), `listing_s` (both, what a run pays, also a
fully cached rerun's only cost in the embed stage), and for comparison `fsspec_find_s`, the walk the
listing replaced (`fsspec` `find`, which stats every entry too, without sizes and mtimes kept). Each is
the median of `--repeats` runs. A run needing more than the free space or inodes asks for fewer files.
Writes `benchmarks/results/listing.json` and prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._machine import machine_info, write_result


def make_tree(root: Path, n_files: int, per_folder: int) -> float:
    """`n_files` empty `.jpg` files in folders of `per_folder`; returns the seconds it took."""
    t0 = time.perf_counter()
    for k in range(n_files):
        folder = root / f"n{k // per_folder:05d}"
        if k % per_folder == 0:
            folder.mkdir(parents=True)
        os.close(os.open(folder / f"{k:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    return time.perf_counter() - t0


def measure(root: Path, repeats: int) -> dict:
    import fsspec

    from alignet_core.io.listing import listing_of
    from alignet_core.io.sources import folder_source

    lists, digests, finds = [], [], []
    n = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        src = folder_source(str(root))
        t1 = time.perf_counter()
        listing = listing_of(src)
        t2 = time.perf_counter()
        lists.append(t1 - t0)
        digests.append(t2 - t1)
        n = listing.n
        del src, listing
    for _ in range(repeats):
        t0 = time.perf_counter()
        fsspec.filesystem("file").find(str(root))
        finds.append(time.perf_counter() - t0)
    list_s, digest_s = statistics.median(lists), statistics.median(digests)
    return {"files": n, "list_s": round(list_s, 3), "digest_s": round(digest_s, 3),
            "listing_s": round(list_s + digest_s, 3), "fsspec_find_s": round(statistics.median(finds), 3),
            "files_per_s": round(n / (list_s + digest_s))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--per-folder", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the tree is generated (removed after)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    st = os.statvfs(args.dir)
    if st.f_favail < args.files * 1.2 + args.files // args.per_folder:
        raise SystemExit(f"{args.dir}: {st.f_favail} free inodes, fewer than {args.files} files need; ask for fewer")
    root = Path(tempfile.mkdtemp(prefix="listing-", dir=args.dir))
    try:
        made = make_tree(root / "images", args.files, args.per_folder)
        result = {"benchmark": "listing", "machine": machine_info(), "per_folder": args.per_folder,
                  "repeats": args.repeats, "make_tree_s": round(made, 1), **measure(root / "images", args.repeats)}
        result["note"] = ("warm metadata caches (the tree was just written); one stat per image, sorted, then the "
                          "sha256 of the (id, size, mtime_ns) rows")
        if not args.no_write:
            write_result("listing", result)
        else:
            print(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
