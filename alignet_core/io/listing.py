"""A source's listing as its identity, and what changed between two listings.

An image source (folder, file list, tar shards) is what it holds, not its config: the embed stage's
key covers the listing's digest, the sha256 of every image's (id, size, mtime_ns) in source order, so an
added, removed, replaced or reordered image is a new key, and an unchanged folder is the same key.

Why (size, mtime_ns) and not a content hash: a content hash reads every byte of every image on every
run (ImageNet's 1.28M images are ~140 GB: minutes to hours before any work), while a stat costs
microseconds and the listing already makes one per file (`benchmarks/results/listing.json`: a
million files in seconds). Writing a file's bytes updates its mtime (ns resolution on Linux
filesystems), so an image replaced under the same name is seen; a `touch` without new bytes is a
false "changed", which costs one image's re-embedding and is never wrong. Not seen: bytes rewritten
with the mtime put back by hand to the same nanosecond at the same size (`cp -p` of a same-sized
file over it) - say so where that matters and change the name. A tar member's fingerprint is its
size and its header's mtime (what `tar` records; reading members' bytes means reading the shards).

`compare` gives what changed against a previous store's rows (ids and fingerprints): the rows to reuse
(same id, same fingerprint: content-addressed per image, so reuse survives reordering), the added,
changed and removed ids.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from alignet_core.io.sources import ImageSource

#: the store arrays that keep each row's fingerprint as the listing saw it
SIZE_ARRAY, MTIME_ARRAY = "source_size", "source_mtime_ns"
#: how many example ids a change report carries per kind
EXAMPLES = 5


@dataclass(frozen=True)
class SourceListing:
    """key: sha256 hex of the (id, size, mtime_ns) rows in source order; n: rows; seconds: the time to
    list and digest. `sizes`, `mtimes`: (n,) int64 fingerprints in source order (-1: not listed)."""

    key: str
    n: int
    seconds: float
    sizes: np.ndarray = field(repr=False, compare=False)
    mtimes: np.ndarray = field(repr=False, compare=False)

    @property
    def listed(self) -> bool:
        """Whether the fingerprints were listed (demo and imported rows carry none)."""
        return bool(self.n) and bool((self.sizes != -1).any())


def listing_of(src: ImageSource, list_seconds: float = 0.0) -> SourceListing:
    """The listing of `src` (already listed; `list_seconds` is what listing it took, added to the digest's)."""
    t0 = time.perf_counter()
    recs = src.records
    sizes = np.fromiter((r.size for r in recs), dtype=np.int64, count=len(recs))
    mtimes = np.fromiter((r.mtime_ns for r in recs), dtype=np.int64, count=len(recs))
    h = hashlib.sha256()
    h.update("\n".join(f"{r.id}\t{r.size}\t{r.mtime_ns}" for r in recs).encode("utf-8", "surrogateescape"))
    return SourceListing(key=h.hexdigest(), n=len(recs), seconds=round(list_seconds + time.perf_counter() - t0, 3),
                         sizes=sizes, mtimes=mtimes)


@dataclass(frozen=True)
class Comparison:
    """What changed from a previous store's rows to a listing.

    new_rows, old_rows: (k,) int64, row `new_rows[j]` of the listing is row `old_rows[j]` of the previous
    store (same id, same fingerprint). added / changed / removed: the ids, in their source's order."""

    new_rows: np.ndarray
    old_rows: np.ndarray
    added: list[str]
    changed: list[str]
    removed: list[str]

    @property
    def unchanged(self) -> int:
        return len(self.new_rows)


def compare(old_ids: np.ndarray, old_sizes: np.ndarray, old_mtimes: np.ndarray,
            src: ImageSource, listing: SourceListing) -> Comparison:
    """Match the listing's rows to a previous store's rows by id and fingerprint.

    old_ids: (m,) str; old_sizes, old_mtimes: (m,) int64; a row whose fingerprint is unknown (-1) on either
    side never matches (it is recomputed)."""
    old_row = {str(i): r for r, i in enumerate(np.asarray(old_ids).tolist())}
    new_rows, old_rows, added, changed = [], [], [], []
    for row, rec in enumerate(src.records):
        r = old_row.get(rec.id)
        if r is None:
            added.append(rec.id)
        elif rec.size >= 0 and old_sizes[r] == listing.sizes[row] and old_mtimes[r] == listing.mtimes[row]:
            new_rows.append(row)
            old_rows.append(r)
        else:
            changed.append(rec.id)
    now = src.row_of
    removed = [str(i) for i in np.asarray(old_ids).tolist() if str(i) not in now]
    return Comparison(np.asarray(new_rows, dtype=np.int64), np.asarray(old_rows, dtype=np.int64), added, changed,
                      removed)
