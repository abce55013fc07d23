"""The extraction's data loading: images read (and, on the PIL path, decoded and transformed) in
DataLoader workers, in batches that never cross a chunk boundary, with failures kept aside.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from alignet_core.errors import InputError
from alignet_core.io.images import decode_image_bytes, is_plain_jpeg, read_image_bytes
from alignet_core.io.sources import ImageRecord, ImageSource

#: one dataset item: (row, (3, h, w) float32 tensor or None, JPEG bytes (m,) uint8 or None, reason or None,
#: the sha256 of the bytes read (32 bytes) or None)
Item = tuple[int, torch.Tensor | None, torch.Tensor | None, str | None, bytes | None]


class ImageDataset(Dataset):
    """Item i → (i, (3, h, w) float32 tensor or None, JPEG bytes (m,) uint8 or None, reason or None,
    sha256 of the bytes read or None).

    With `jpeg_bytes`, a whole plain JPEG comes back undecoded (for a batched decode on the extraction
    device); everything else is decoded and transformed here by PIL, or fails with its reason. The digest
    of the bytes read (the row's content, `io.listing.DIGEST_ARRAY`) costs a hash of bytes already in memory;
    it is None when the file could not be read or changed since the listing.
    """

    def __init__(self, source: ImageSource, transform: Callable[[Any], torch.Tensor], jpeg_bytes: bool = False) -> None:
        self.records = source.records
        self.transform = transform
        self.jpeg_bytes = jpeg_bytes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item:
        rec = self.records[i]
        path = rec.path
        digest = None
        try:
            data = read_image_bytes(path)
            if (moved := changed_since_listing(rec, len(data))) is not None:
                return i, None, None, moved, None
            digest = hashlib.sha256(data).digest()
            if self.jpeg_bytes and is_plain_jpeg(data):
                return i, None, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, digest
            return i, self.transform(decode_image_bytes(data, path)), None, None, digest
        except (InputError, OSError, ValueError) as err:
            return i, None, None, str(err), digest


def changed_since_listing(rec: ImageRecord, n_read: int) -> str | None:
    """Why the bytes just read are not the ones the run listed, or None: a local file whose size or mtime
    after the read differs from the listing's (written while the run read it, or since it was listed),
    or whose bytes read are not the listed size. Such an image is refused (skipped, its row invalid and
    its listed fingerprint kept), never embedded under the listing's fingerprint: the next run lists it
    anew and embeds its new bytes."""
    if rec.size < 0 or "://" in rec.path:
        return None
    try:
        st = os.stat(rec.path)
    except OSError as err:
        return f"changed while the run read it: {err}"
    if (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns) and n_read == rec.size:
        return None
    return (f"changed while the run read it (listed {rec.size} bytes, mtime_ns {rec.mtime_ns}; read {n_read} bytes, "
            f"now {st.st_size} bytes, mtime_ns {st.st_mtime_ns}); refused: a rerun lists and embeds its new bytes")


def collate(items: list[Item]) -> dict[str, Any]:
    """Stack the decoded images of a batch; keep JPEG bytes, failures (with their reasons) and the digests
    of the bytes read aside."""
    ok = [(i, x) for i, x, _, _, _ in items if x is not None]
    return {
        "index": torch.tensor([i for i, _ in ok], dtype=torch.long),
        "x": torch.stack([x for _, x in ok]) if ok else None,
        "jpeg_index": [i for i, _, b, _, _ in items if b is not None],
        "jpeg": [b for _, _, b, _, _ in items if b is not None],
        "failed": [(i, reason) for i, x, b, reason, _ in items if x is None and b is None],
        "digest": [(i, d) for i, _, _, _, d in items if d is not None],
    }


def end_with_parent(parent_pid: int, _worker_id: int) -> None:
    """DataLoader worker init: on Linux, have the kernel SIGKILL this loader worker when its parent dies.

    torch's own watchdog looks only every 5 s, and a worker whose output pipe is full when its parent
    is killed (SIGKILL, OOM killer) never gets there: it would linger forever, holding memory.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def row_batches(chunks: list[tuple[int, int, int]], batch_size: int, reused: Any = None) -> list[list[int]]:
    """Row indices per batch; batches stay inside their chunk so the result never depends on resume. Rows
    where `reused` ((n,) bool, optional) is True are left out: their rows were copied from a previous store."""
    if reused is None:
        return [list(range(b, min(b + batch_size, stop))) for _, start, stop in chunks
                for b in range(start, stop, batch_size)]
    out = []
    for _, start, stop in chunks:
        rows = [start + int(j) for j in (~reused[start:stop]).nonzero()[0]]
        out.extend(rows[b : b + batch_size] for b in range(0, len(rows), batch_size))
    return out


def image_loader(
    source: ImageSource,
    transform: Callable[[Any], torch.Tensor],
    jpeg_bytes: bool,
    chunks: list[tuple[int, int, int]],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    reused: Any = None,
) -> DataLoader:
    """The extraction's DataLoader over the rows of `chunks` ((index, start, stop) each): batches of
    `collate` dicts from `num_workers` processes, in pinned host memory when `device` is a GPU (so the
    copy to it can overlap the forward pass of the batch before)."""
    return DataLoader(
        ImageDataset(source, transform, jpeg_bytes=jpeg_bytes),
        batch_sampler=row_batches(chunks, batch_size, reused),
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        worker_init_fn=functools.partial(end_with_parent, os.getpid()),
    )
