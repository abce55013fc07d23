"""File formats: THINGS-style human triplets and the official AligNet `.npz` datasets.

THINGS triplets: one row per trial, `i j k` object ids (0-based), `k` the odd one out; as text
(whitespace or comma separated) or `.npy` (n, 3) integers. Optional response probabilities are
an `.npy` (n, 3) float array: the probability that pair (i, j), (i, k), (j, k) is the most
similar pair, i.e. that k, j, i respectively is the odd one out.

AligNet `.npz` (google-deepmind/alignet): `indices` int (n, 3) rows into the image pool,
`filenames` str (n, 3), `similarities` float (n, 3) = [s01, s02, s12]. We write rows with s01
strictly largest (images 0 and 1 are the most similar pair, image 2 the odd one out), which
satisfies every statement of the official README and metric. Files from elsewhere are not
trusted by position: the reader derives the odd one out from the similarities and reports how
many rows disagree with their position.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import typing
import uuid
import zipfile
from dataclasses import dataclass

import fsspec
import numpy as np

from alignet_core.errors import InputError
from alignet_core.io import limits, store

log = logging.getLogger(__name__)

ALIGNET_KEYS = ("indices", "filenames", "similarities")


# ----------------------------------------------------------------------------- THINGS triplets
def validate_triplets(triplets: np.ndarray, n_objects: int | None, what: str,
                      lines: list[int] | None = None) -> np.ndarray:
    """Check shape (n, 3), integer ids, range and distinctness; return int64 triplets.

    `lines` are the 1-based file lines of the rows (text files), so that an error names the line an
    editor shows; without them an error names the row's 0-based array index."""
    t = np.asarray(triplets)
    if t.ndim != 2 or t.shape[1] != 3:
        raise InputError(f"{what}: expected shape (n, 3), got {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        if not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
            raise InputError(f"{what}: object ids must be integers")
    t = t.astype(np.int64)

    def where(mask: np.ndarray) -> tuple[str, list[int]]:
        row = int(np.argwhere(mask)[0, 0])
        return (f"line {lines[row]}" if lines is not None else f"row {row} (0-based)"), t[row].tolist()

    if (t < 0).any():
        at, ids = where((t < 0).any(1))
        raise InputError(f"{what}: negative object id in {at}: {ids}")
    if n_objects is not None and (t >= n_objects).any():
        at, ids = where((t >= n_objects).any(1))
        raise InputError(f"{what}: object id out of range [0, {n_objects}) in {at}: {ids}")
    dup = (t[:, 0] == t[:, 1]) | (t[:, 0] == t[:, 2]) | (t[:, 1] == t[:, 2])
    if dup.any():
        at, ids = where(dup)
        raise InputError(f"{what}: an object appears twice in {at}: {ids}")
    return t


def _well_formed_triplets(text: str) -> np.ndarray | None:
    """The rows of a triplet text without comments in one pass of numpy's C parser (100k lines: 50 ms
    instead of a second); None when any line is not three integers, for the line-by-line parse to name it."""
    if "#" in text:
        return None
    try:
        arr = np.loadtxt(io.StringIO(text.replace(",", " ")), dtype=np.int64, ndmin=2)
    except ValueError:
        return None
    return arr if arr.ndim == 2 and arr.shape[1] == 3 and len(arr) else None


def read_things_triplets(url: str, n_objects: int | None = None) -> np.ndarray:
    """Read THINGS triplets (text or .npy) as int64 (n, 3), the odd one out in column 2."""
    try:
        with fsspec.open(url, "rb") as f:
            lines = None
            if url.endswith(".npy"):
                limits.check_npy(f, url)
                arr = np.load(f, allow_pickle=False)
            else:
                text = f.read().decode()
                fast = _well_formed_triplets(text)
                if fast is not None:
                    with contextlib.suppress(InputError):  # a bad id: the parse below names its line
                        return validate_triplets(fast, n_objects, url)
                numbered = [(i, ln.replace(",", " ").split()) for i, ln in enumerate(text.splitlines(), start=1)
                            if ln.strip() and not ln.startswith("#")]
                lines = [i for i, _ in numbered]
                rows = [r for _, r in numbered]
                bad = next((k for k, r in enumerate(rows) if len(r) != 3), None)
                if bad is not None:
                    raise InputError(f"{url}: line {lines[bad]} has {len(rows[bad])} fields, expected 3 ('i j k')")
                try:
                    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
                except ValueError:
                    bad = next(k for k, r in enumerate(rows) if not all(v.lstrip("-").isdigit() for v in r))
                    raise InputError(f"{url}: line {lines[bad]}: object ids must be integers, got "
                                     f"{' '.join(rows[bad])[:80]!r}") from None
    except FileNotFoundError:
        raise InputError(f"triplet file {url!r} does not exist") from None
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{url}: not a readable triplet file ({err})") from None
    return validate_triplets(arr, n_objects, url, lines)


def write_things_triplets(url: str, triplets: np.ndarray) -> None:
    """Write triplets as text rows `i j k` (k the odd one out)."""
    t = validate_triplets(triplets, None, "triplets")
    store.write_bytes_atomic(url, ("\n".join(f"{a} {b} {c}" for a, b, c in t.tolist()) + "\n").encode())


def read_probabilities(url: str, n_triplets: int) -> np.ndarray:
    """Read (n, 3) response probabilities over pairs [(i,j), (i,k), (j,k)]; rows must sum to 1."""
    p = store.read_npy(url, "probability")
    if p.shape != (n_triplets, 3):
        raise InputError(f"{url}: expected shape ({n_triplets}, 3) to match the triplets, got {p.shape}")
    p = p.astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise InputError(f"{url}: probabilities must be finite, non-negative and sum to 1 per row")
    return p


def write_probabilities(url: str, probs: np.ndarray) -> None:
    store.write_npy(url, np.asarray(probs, dtype=np.float32))


# ----------------------------------------------------------------------------- AligNet .npz
@dataclass(frozen=True)
class AlignetTriplets:
    """An AligNet dataset split: rows ordered so that image 2 is the odd one out."""

    indices: np.ndarray  # (n, 3) int64
    filenames: np.ndarray  # (n, 3) str
    similarities: np.ndarray  # (n, 3) float32, [s01, s02, s12]
    n_reordered: int = 0  # rows whose position disagreed with their similarities (reader only)

    def __len__(self) -> int:
        return len(self.indices)


def order_by_similarity(indices: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder each triplet so its most similar pair comes first.

    indices: (n, 3) int; sims: (n, 3) [s01, s02, s12]. Returns (indices', sims', perm) where
    perm (n, 3) gives, for each row, the original positions now at 0, 1, 2.
    """
    best = np.argmax(sims, axis=1)  # most similar pair: 0 (0,1), 1 (0,2), 2 (1,2)
    image_perm = np.array([[0, 1, 2], [0, 2, 1], [1, 2, 0]])[best]
    # where each new pair's similarity sits among the old [s01, s02, s12]
    sim_perm = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])[best]
    return (
        np.take_along_axis(indices, image_perm, axis=1),
        np.take_along_axis(sims, sim_perm, axis=1),
        image_perm,
    )


def write_alignet_npz(url: str, indices: np.ndarray, filenames: np.ndarray, similarities: np.ndarray) -> None:
    """Write an official-format split atomically; every row must already have s01 strictly largest."""
    indices = np.asarray(indices, dtype=np.int64)
    similarities = np.asarray(similarities, dtype=np.float32)
    filenames = np.asarray(filenames, dtype=str)
    n = len(indices)
    for key, arr in (("indices", indices), ("filenames", filenames), ("similarities", similarities)):
        if arr.shape != (n, 3):
            raise InputError(f"{key}: expected shape ({n}, 3), got {arr.shape}")
    strict = (similarities[:, 0] > similarities[:, 1]) & (similarities[:, 0] > similarities[:, 2])
    if not strict.all():
        raise InputError(f"similarities: {int((~strict).sum())} rows where s01 is not the strict maximum")
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        savez_reproducible(f, {"indices": indices, "filenames": filenames, "similarities": similarities})
    store.replace_durably(fs, tmp, path)


def savez_reproducible(fileobj: "typing.BinaryIO", arrays: dict[str, np.ndarray]) -> None:
    """Like `np.savez`, but with a fixed zip timestamp so equal arrays give byte-identical files."""
    with zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def sampling_name(strategy: str, k: int) -> str:
    """The official file name of a sampling: cluster strategies carry k (`cluster_border_500`)."""
    return f"{strategy}_{k}" if strategy.startswith("cluster") else strategy


def read_alignet_npz(url: str, n_images: int | None = None) -> AlignetTriplets:
    """Read and validate an official-format split; rows are reordered by their similarities.

    Raises `InputError` naming the file and the problem (missing key, shape, dtype, range).
    """
    try:
        with fsspec.open(url, "rb") as f:
            limits.check_npz(f, url)
            z = np.load(f, allow_pickle=False)
            missing = [k for k in ALIGNET_KEYS if k not in z.files]
            if missing:
                raise InputError(f"{url}: missing array(s) {missing}; an AligNet file has {list(ALIGNET_KEYS)}")
            try:
                idx, names, sims = z["indices"], z["filenames"], z["similarities"]
            except ValueError as err:
                raise InputError(f"{url}: an array holds Python objects, refused ({err})") from None
    except FileNotFoundError:
        raise InputError(f"AligNet file {url!r} does not exist") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{url}: not a readable AligNet .npz file (a zip of .npy arrays "
                         f"{list(ALIGNET_KEYS)}): {err}") from None
    n = len(idx)
    for key, arr in (("indices", idx), ("filenames", names), ("similarities", sims)):
        if arr.ndim != 2 or arr.shape != (n, 3):
            raise InputError(f"{url}: '{key}' has shape {arr.shape}, expected ({n}, 3)")
    if not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"{url}: 'indices' must be integers, got {idx.dtype}")
    if not np.issubdtype(sims.dtype, np.floating) or not np.isfinite(sims).all():
        raise InputError(f"{url}: 'similarities' must be finite floats, got {sims.dtype}")
    if names.dtype.kind not in "US":
        raise InputError(f"{url}: 'filenames' must be strings, got {names.dtype}")
    idx = validate_triplets(idx, n_images, f"{url}: 'indices'")
    sims = sims.astype(np.float32)
    names = names.astype(str)
    out_idx, out_sims, perm = order_by_similarity(idx, sims)
    out_names = np.take_along_axis(names, perm, axis=1)
    n_reordered = int((perm[:, 2] != 2).sum())
    if n_reordered:
        log.warning("%s: %d of %d rows had the odd one out not last; reordered by similarity", url, n_reordered, n)
    return AlignetTriplets(out_idx, out_names, out_sims, n_reordered)
