"""A source's listing (io/listing.py): its digest is the source's identity, and `compare` matches rows by
id and fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from alignet_core.io.listing import compare, listing_of
from alignet_core.io.sources import filelist_source, folder_source


def _tree(root: Path) -> None:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"{k}.png").write_bytes(bytes([k]) * (k + 1))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"x")
    (root / "a" / "notes.txt").write_text("not an image")


def test_the_listing_digest_changes_exactly_when_the_images_do(tmp_path: Path) -> None:
    _tree(tmp_path)
    src = folder_source(str(tmp_path))
    first = listing_of(src)
    assert first.n == 6 and [r.id for r in src.records] == ["a/0.png", "a/1.png", "a/2.png", "b/0.png", "b/1.png",
                                                           "b/2.png"]
    assert src.records[2].size == 3 and src.records[2].mtime_ns == (tmp_path / "a" / "2.png").stat().st_mtime_ns
    assert listing_of(folder_source(str(tmp_path))).key == first.key  # listed again: the same identity
    st = (tmp_path / "b" / "1.png").stat()
    os.utime(tmp_path / "b" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # one nanosecond later
    touched = listing_of(folder_source(str(tmp_path)))
    assert touched.key != first.key

    c = compare(np.array([r.id for r in src.records]), first.sizes, first.mtimes, folder_source(str(tmp_path)),
                touched)
    assert (c.added, c.changed, c.removed, c.unchanged) == ([], ["b/1.png"], [], 5)


def test_a_reordered_file_list_is_a_new_identity_whose_rows_all_match(tmp_path: Path) -> None:
    _tree(tmp_path)
    names = ["a/0.png", "a/1.png", "b/2.png"]
    (tmp_path / "l.txt").write_text("\n".join(names))
    one = filelist_source(str(tmp_path / "l.txt"))
    (tmp_path / "l.txt").write_text("\n".join(reversed(names)))
    two = filelist_source(str(tmp_path / "l.txt"))
    a, b = listing_of(one), listing_of(two)
    assert a.key != b.key
    c = compare(one.ids(), a.sizes, a.mtimes, two, b)
    assert c.unchanged == 3 and c.new_rows.tolist() == [0, 1, 2] and c.old_rows.tolist() == [2, 1, 0]
    (tmp_path / "a" / "0.png").unlink()
    missing = filelist_source(str(tmp_path / "l.txt"))
    assert missing.records[2].size == -2  # listed but absent: never matches a stored row, its read says why
