"""A source's listing as its identity, and what changed between two listings.

An image source (folder, file list, tar shards) is what it holds, not its config: the embed stage's
key covers the listing's digest, the sha256 of every image's (id, size, mtime_ns) in source order, so an
added, removed, replaced or reordered image is a new key, and an unchanged folder is the same key.

Why (size, mtime_ns) and not a content hash in the listing: a content hash reads every byte of every image
on every run (ImageNet's 1.28M images are ~140 GB: minutes to hours before any work), while a stat costs
microseconds and the listing already makes one per file (`benchmarks/results/listing.json`: a
million files in seconds). Writing a file's bytes updates its mtime (ns resolution on Linux
filesystems), so an image replaced under the same name is seen. The stat only picks the *candidates*: the
embed store keeps each row's content sha256 (`DIGEST_ARRAY`, hashed from the bytes the extraction reads
anyway), and a candidate whose bytes hash the same as its row's is unchanged (*touched*: a `touch`, a
copy that kept the bytes), its row reused; only a candidate is read to be hashed, and it would have been
read to be embedded. Stores made before the digests fall back to the fingerprint alone (a `touch`
re-embeds, never wrong). Not seen: bytes rewritten with the mtime put back by hand to the same nanosecond
at the same size (`cp -p` of a same-sized file over it) - say so where that matters and change the name.
A tar member's fingerprint is its size and its shard file's mtime (not the header's, which a shard rewritten
with a member's bytes changed at the same size can keep): a rewritten shard makes every member a candidate,
and the digests leave the unchanged ones reused (hashing them reads the shard once, as embedding would).

`compare` gives what changed against a previous store's rows (ids and fingerprints): the rows to reuse
(same id, same fingerprint: content-addressed per image, so reuse survives reordering), the added,
changed and removed ids, and the candidates found *touched* (same bytes, reused).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from alignet_core.io.sources import listing_digest

if TYPE_CHECKING:
    from alignet_core.io.sources import ImageRecord, ImageSource

#: the store arrays that keep each row's fingerprint as the listing saw it
SIZE_ARRAY, MTIME_ARRAY = "source_size", "source_mtime_ns"
#: the store array of each row's content sha256, (n, 32) uint8, all zero where unknown (never read)
DIGEST_ARRAY = "source_sha256"
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
        """Whether the fingerprints were listed (demo rows and imported rows without `source.images` carry none)."""
        return bool(self.n) and bool((self.sizes != -1).any())


def listing_of(src: ImageSource, list_seconds: float = 0.0) -> SourceListing:
    """The listing of `src` (already listed; `list_seconds` is what listing it took, added to the digest's)."""
    t0 = time.perf_counter()
    recs = src.records
    sizes = np.fromiter((r.size for r in recs), dtype=np.int64, count=len(recs))
    mtimes = np.fromiter((r.mtime_ns for r in recs), dtype=np.int64, count=len(recs))
    return SourceListing(key=listing_digest(recs), n=len(recs), seconds=round(list_seconds + time.perf_counter() - t0, 3),
                         sizes=sizes, mtimes=mtimes)


@dataclass(frozen=True)
class Comparison:
    """What changed from a previous store's rows to a listing.

    new_rows, old_rows: (k,) int64, row `new_rows[j]` of the listing is row `old_rows[j]` of the previous
    store (same id, and the same fingerprint or the same content). added / changed / removed: the ids, in
    their source's order; touched: the reused ids whose fingerprint changed but whose bytes did not."""

    new_rows: np.ndarray
    old_rows: np.ndarray
    added: list[str]
    changed: list[str]
    removed: list[str]
    touched: list[str] = field(default_factory=list)

    @property
    def unchanged(self) -> int:
        return len(self.new_rows)


def compare(old_ids: np.ndarray, old_sizes: np.ndarray, old_mtimes: np.ndarray,
            src: ImageSource, listing: SourceListing, old_digests: np.ndarray | None = None,
            digest_of: Callable[[ImageRecord], bytes | None] | None = None) -> Comparison:
    """Match the listing's rows to a previous store's rows by id and fingerprint.

    old_ids: (m,) str; old_sizes, old_mtimes: (m,) int64; a row whose fingerprint is unknown (-1) on either
    side never matches (it is recomputed). old_digests: (m, 32) uint8, the rows' content sha256 (all zero:
    unknown); with `digest_of` (a record → the sha256 of its bytes now, None when unreadable), a candidate
    (same id and size, another mtime) whose old digest is known and equals its digest now is reused, *touched*
    (another size is other bytes: never read)."""
    old_row = {str(i): r for r, i in enumerate(np.asarray(old_ids).tolist())}
    new_rows, old_rows, added, changed, touched = [], [], [], [], []
    for row, rec in enumerate(src.records):
        r = old_row.get(rec.id)
        if r is None:
            added.append(rec.id)
        elif rec.size >= 0 and old_sizes[r] == listing.sizes[row] and old_mtimes[r] == listing.mtimes[row]:
            new_rows.append(row)
            old_rows.append(r)
        elif rec.size >= 0 and old_sizes[r] == listing.sizes[row] and _same_bytes(rec, r, old_digests, digest_of):
            new_rows.append(row)
            old_rows.append(r)
            touched.append(rec.id)
        else:
            changed.append(rec.id)
    now = src.row_of
    removed = [str(i) for i in np.asarray(old_ids).tolist() if str(i) not in now]
    return Comparison(np.asarray(new_rows, dtype=np.int64), np.asarray(old_rows, dtype=np.int64), added, changed,
                      removed, touched)


def _same_bytes(rec: ImageRecord, old_row: int, old_digests: np.ndarray | None,
                digest_of: Callable[[ImageRecord], bytes | None] | None) -> bool:
    """Whether the candidate `rec` holds the bytes its previous row was embedded from (both digests known)."""
    if old_digests is None or digest_of is None:
        return False
    old = np.asarray(old_digests[old_row], dtype=np.uint8).tobytes()
    if old == bytes(32):
        return False
    return digest_of(rec) == old


def content_digest(rec: ImageRecord) -> bytes | None:
    """The sha256 (32 bytes) of the image's bytes as they are now (file, URL or tar member), None when
    they cannot be read (the image is then a changed one, embedded or skipped with its reason)."""
    from alignet_core.errors import InputError
    from alignet_core.io.images import read_image_bytes

    try:
        return hashlib.sha256(read_image_bytes(rec.path)).digest()
    except (InputError, OSError):
        return None
