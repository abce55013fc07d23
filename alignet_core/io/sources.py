"""Image sources with stable ids: the shipped demo set, folders, file lists and tar shards.

A source is an ordered, immutable list of `ImageRecord(id, path, label)`. The id is what ties a row of
an embedding store to its image, so it must be unique and must not depend on where the data lives:
the emoji id for the demo set, the path relative to the root (folder), a CSV list's id column or the
path relative to the list's folder (absolute for a file outside it), `<shard>/<key>` for webdataset-style tar shards. Paths may be fsspec URLs; local paths
are the main case. An image inside a tar shard is named by fsspec's chained URL
`tar://<member>::<shard url>`, which `read_tar_member` reads (one index per shard and process,
then one seek per image). Decoding is `alignet_core.io.images`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from alignet_core.errors import InputError
from alignet_core.io import limits, store
from alignet_core.io.tar_shards import (
    LABEL_EXTENSIONS,
    expand_shards,
    open_tar,
    shard_name,
    tar_index,
    tar_member_url,
    url_of,
)

if TYPE_CHECKING:
    from alignet_core.io.source_config import SourceConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LABEL_LEVELS = ("category", "subcategory")


@dataclass(frozen=True)
class ImageRecord:
    """One image: a stable unique id, where its bytes are (path or fsspec URL), an optional class label
    and, for a two-level taxonomy (coarse → fine), the finer label; `size` and `mtime_ns` are what the
    listing saw of its bytes (its fingerprint: `io.listing`)."""

    id: str
    path: str
    label: str | None = None
    fine: str | None = None
    size: int = -1  # bytes when listed (a tar member: its size in the shard); -1: not listed (demo, imported)
    mtime_ns: int = -1  # modification time when listed, ns (a tar member: its shard file's); -1: not listed


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of images; row i of every store written from it belongs to `records[i]`.

    Construction rejects an empty list and duplicate ids (`InputError` naming `description`).
    """

    records: tuple[ImageRecord, ...]
    description: str

    def __post_init__(self) -> None:
        if not self.records:
            raise InputError(f"{self.description}: no images found")
        if len({r.id for r in self.records}) == len(self.records):  # the common case, cheaper than counting
            return
        dup = [i for i, c in Counter(r.id for r in self.records).items() if c > 1]
        if dup:
            raise InputError(
                f"{self.description}: {len(dup)} duplicate image id(s), each id must be unique; e.g. {dup[:3]}"
            )

    def __len__(self) -> int:
        return len(self.records)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Image id → its row; built once per source (a million ids take a second)."""
        return {r.id: row for row, r in enumerate(self.records)}

    def ids(self) -> np.ndarray:
        """(n,) str: the image ids in source order."""
        return np.asarray([r.id for r in self.records], dtype=str)

    def paths(self) -> list[str]:
        """The n image paths (or URLs) in source order."""
        return [r.path for r in self.records]

    def labels(self) -> np.ndarray:
        """(n,) str: class labels in source order, '' where unknown."""
        return np.asarray([r.label or "" for r in self.records], dtype=str)

    def taxonomy(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(coarse, fine) (n,) str labels when every image has both levels, else None."""
        if not all(r.label and r.fine for r in self.records):
            return None
        return self.labels(), np.asarray([r.fine for r in self.records], dtype=str)


# ----------------------------------------------------------------------------- the demo set
def demo_data_dir() -> Path:
    """The folder of the shipped emoji demo set (`metadata.csv`, `images/`)."""
    return Path(__file__).resolve().parent.parent / "data"


def demo_metadata() -> list[dict[str, str]]:
    """Rows of the demo's metadata.csv (id, image, name, category, subcategory, sort_order), in file order."""
    path = demo_data_dir() / "metadata.csv"
    if not path.is_file():
        raise InputError(f"{path}: the demo dataset is missing; rebuild it with `python scripts/build_demo_data.py`")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def demo_source(label_level: str = "category") -> ImageSource:
    """The 1,906 emoji images in metadata.csv order, labelled by `label_level` ('category' or 'subcategory')."""
    if label_level not in LABEL_LEVELS:
        raise InputError(f"source.label_level: expected one of {LABEL_LEVELS}, got {label_level!r}")
    images = demo_data_dir() / "images"
    records = tuple(
        ImageRecord(id=row["id"], path=str(images / row["image"]), label=row[label_level],
                    fine=row["subcategory"] if label_level == "category" else None)
        for row in demo_metadata()
    )
    return ImageSource(records, description=f"demo emoji set ({demo_data_dir()})")


# ----------------------------------------------------------------------------- folders and lists
def _is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


#: threads that list and stat folders at once (a stat waits on the filesystem, not on Python)
LIST_THREADS = 8


def _walk_local(base: str) -> list[tuple[str, int, int]]:
    """(path relative to `base`, size, mtime_ns) of every image file under a local folder, hidden files and
    folders skipped: `os.scandir` and one `stat` per image, folders in `LIST_THREADS` threads (the stats of
    one folder overlap another's; `benchmarks/listing.py`)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    def scan(rel_dir: str) -> tuple[list[tuple[str, int, int]], list[str]]:
        files, dirs = [], []
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                if e.is_dir():
                    dirs.append(rel)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    st = e.stat()
                    files.append((rel, st.st_size, st.st_mtime_ns))
        return files, dirs

    out: list[tuple[str, int, int]] = []
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="listing") as pool:
        pending = {pool.submit(scan, "")}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                files, dirs = f.result()
                out.extend(files)
                pending |= {pool.submit(scan, d) for d in dirs}
    return out


def _mtime_ns(info: dict[str, Any]) -> int:
    """An fsspec `info` dict's modification time in ns (-1 when the filesystem gives none)."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return int(round(float(v) * 1e9))
        if hasattr(v, "timestamp"):
            return int(round(v.timestamp() * 1e9))
    return -1


def folder_source(root: str) -> ImageSource:
    """Every image under `root` (a `class/*.jpg` tree), sorted by relative path, each with its size and
    mtime (the listing's fingerprint of its bytes).

    id = the path relative to root ('cat/0001.jpg'); label = the first folder under root (None for
    images directly in root). Hidden files and other extensions are ignored.
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(base):
        raise InputError(f"source.path: folder {root!r} does not exist (expected a folder of class sub-folders)")
    base = base.rstrip("/") or "/"
    if isinstance(fs, LocalFileSystem):
        found = sorted(_walk_local(base))
        sep = "" if base.endswith("/") else "/"
        records = [ImageRecord(id=rel, path=f"{base}{sep}{rel}", label=rel.split("/")[0] if "/" in rel else None,
                               size=size, mtime_ns=mtime) for rel, size, mtime in found]
    else:
        records = []
        for p, info in sorted(fs.find(base, detail=True).items()):
            rel = p[len(base) :].lstrip("/")
            if not _is_image_name(rel) or any(part.startswith(".") for part in rel.split("/")):
                continue
            label = rel.split("/")[0] if "/" in rel else None
            records.append(ImageRecord(id=rel, path=url_of(fs, p), label=label, size=int(info.get("size") or 0),
                                       mtime_ns=_mtime_ns(info)))
    if not records:
        raise InputError(f"{root!r}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return ImageSource(tuple(records), description=f"folder {root!r}")


def _resolve(base: str, entry: str) -> tuple[str, str]:
    """(id, path) of a list entry: relative paths resolve against the list's folder `base`; the id is
    the path relative to `base`, or the normalized absolute path (or URL) of a file outside it."""
    entry = entry.strip().replace("\\", "/")
    if "://" in entry:
        return entry, entry
    full = posixpath.normpath(entry if posixpath.isabs(entry) else posixpath.join(base, entry))
    rel = posixpath.relpath(full, base) if posixpath.isabs(full) == posixpath.isabs(base) else ".."
    inside = not (rel == ".." or rel.startswith("../") or posixpath.isabs(rel))
    return (rel if inside else full), full


def _csv_entries(text: str, path: str, path_column: str, label_columns: list[str] | None,
                 id_column: str | None) -> list[tuple[str, str | None, str | None, str | None]]:
    """(path, id or None, coarse label, fine label) of each CSV row with a path; the columns are checked
    against the header first, each refusal naming its `source.*` field."""
    reader = csv.DictReader(io.StringIO(text))
    fields = [c.strip() for c in (reader.fieldnames or [])]
    levels = label_columns if label_columns is not None else (["label"] if "label" in fields else [])
    for field, cols in (("path_column", [path_column]), ("label_columns", levels),
                        ("id_column", [id_column] if id_column else [])):
        missing = [c for c in cols if c not in fields]
        if missing:
            raise InputError(f"source.{field}: {path}: the CSV header has no column {missing[0]!r}; its columns are "
                             f"{fields} (set source.path_column, source.label_columns, source.id_column to match)")
    out = []
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get(path_column):
            continue
        if id_column and not row.get(id_column):
            raise InputError(f"source.id_column: {path}, line {reader.line_num}: empty {id_column!r}")
        names = [row.get(c) or None for c in levels]
        out.append((row[path_column], row.get(id_column) if id_column else None, *(names + [None, None])[:2]))
    return out


def _stat(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a listed file; (-2, -2) for a file that is missing now (its read will fail and
    say so; a file that appears later changes the listing)."""
    try:
        if "://" in path:
            f, p = fsspec.core.url_to_fs(path)
            info = f.info(p)
            return int(info.get("size") or 0), _mtime_ns(info)
        if isinstance(fs, LocalFileSystem):
            st = os.stat(path)
            return st.st_size, st.st_mtime_ns
        info = fs.info(path)
        return int(info.get("size") or 0), _mtime_ns(info)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return -2, -2


def filelist_source(path: str, path_column: str = "path", label_columns: list[str] | None = None,
                    id_column: str | None = None) -> ImageSource:
    """Images named in a list file, in file order.

    `.csv`: a header with the `path_column`, optional label columns (`label_columns`, coarse → fine;
    by default a `label` column) and an optional `id_column`; any other extension: one path per line
    (blank lines and lines starting with '#' skipped). Relative paths resolve against the list's folder;
    absolute paths and paths outside that folder are read where they are (a read-only image tree needs
    no copy). id = the `id_column`, else the path relative to the list's folder, else (outside it) the
    normalized absolute path. Reading only: nothing is ever written next to the images.
    """
    fs, entries = _filelist_entries(path, path_column, label_columns, id_column)
    records = []
    for image_id, full, coarse, fine in entries:
        size, mtime = _stat(fs, full)
        records.append(ImageRecord(id=image_id, path=full if "://" in full else url_of(fs, full),
                                   label=coarse, fine=fine, size=size, mtime_ns=mtime))
    return ImageSource(tuple(records), description=f"file list {path!r}")


def _filelist_entries(path: str, path_column: str, label_columns: list[str] | None, id_column: str | None,
                      ) -> tuple[fsspec.AbstractFileSystem, list[tuple[str, str, str | None, str | None]]]:
    """The list file's filesystem and its entries, (id, full path, coarse label, fine label) in file order:
    `filelist_source` without a stat of any image."""
    fs, lpath = fsspec.core.url_to_fs(path)
    if not fs.isfile(lpath):
        raise InputError(f"source.path: file list {path!r} does not exist")
    base = posixpath.dirname(posixpath.normpath(lpath.replace("\\", "/"))) or "."
    with fs.open(lpath, "rt", encoding="utf-8", newline="") as f:
        text = f.read()
    if lpath.lower().endswith(".csv"):
        rows = _csv_entries(text, path, path_column, label_columns, id_column)
    else:
        rows = [(ln.strip(), None, None, None) for ln in text.splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    entries = []
    for entry, given_id, coarse, fine in rows:
        rel, full = _resolve(base, entry)
        entries.append((given_id or rel, full, coarse, fine))
    return fs, entries


def tar_source(urls_or_glob: str | list[str] | tuple[str, ...]) -> ImageSource:
    """Images in webdataset-style tar shards, shard by shard (sorted by URL), members in tar order.

    Members are grouped by key, the member name up to the first '.' of its file name
    (`0001.jpg`, `0001.cls` → key `0001`); a key's first image member is its image and its `.cls` or
    `.txt` member (stripped text, at most `limits.MAX_LABEL_BYTES`) its label. id = `<shard name without .tar>/<key>`; path =
    `tar://<member>::<shard url>`. Keys without an image member are ignored. Read with Python's
    tarfile through fsspec, so shards may be local paths or fsspec URLs; `.tar.gz` works but each
    image then decompresses from the start of its shard, so prefer plain `.tar`.
    """
    records: list[ImageRecord] = []
    for shard in expand_shards(urls_or_glob):
        _, shard_ns = _stat(*fsspec.core.url_to_fs(shard))  # before the index: rewritten after it, a candidate next time
        index = tar_index(shard, fresh=True)
        images: dict[str, str] = {}
        labels: dict[str, str] = {}
        with fsspec.open(shard, "rb") as f, open_tar(f) as tf:
            for name, info in index.items():
                norm = posixpath.normpath(name)
                if posixpath.isabs(name) or norm == ".." or norm.startswith("../"):
                    raise InputError(f"source.path: tar shard {shard!r} has member {name!r}, which points outside "
                                     "the shard; member names must be relative paths without '..'")
                folder, base = posixpath.split(name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = posixpath.join(folder, stem)
                if _is_image_name(base):
                    images.setdefault(key, name)
                elif ext.lower() in LABEL_EXTENSIONS and key not in labels:
                    if info.size > limits.MAX_LABEL_BYTES:
                        raise InputError(f"source.path: tar shard {shard!r} has label member {name!r} of {info.size} "
                                         f"bytes (a label is a class name: at most {limits.MAX_LABEL_BYTES}); refused")
                    member_file = tf.extractfile(info)
                    text = member_file.read().decode("utf-8", errors="replace").strip() if member_file else ""
                    labels[key] = text
        prefix = shard_name(shard)
        # a member's fingerprint: its size and its shard's mtime (a rewritten shard makes every member a
        # candidate, whose bytes' digest then tells the changed from the same: `io.listing`)
        records.extend(
            ImageRecord(id=f"{prefix}/{key}", path=tar_member_url(shard, name), label=labels.get(key) or None,
                        size=int(index[name].size),
                        mtime_ns=shard_ns if shard_ns >= 0 else int(index[name].mtime) * 10**9)
            for key, name in images.items()
        )
    desc = urls_or_glob if isinstance(urls_or_glob, str) else f"{len(urls_or_glob)} shard pattern(s)"
    if not records:
        raise InputError(f"{desc!r}: no images found in the tar shards (expected members ending in {', '.join(IMAGE_EXTENSIONS)})")
    return ImageSource(tuple(records), description=f"tar shards {desc!r}")


def source_from_config(cfg: SourceConfig) -> ImageSource:
    """The source a `SourceConfig` describes (an evenly spaced subset when `limit` is set)."""
    if cfg.kind == "demo":
        src = demo_source(cfg.label_level or "category")
    elif cfg.kind == "folder":
        src = folder_source(str(cfg.path))
    elif cfg.kind == "filelist":
        src = filelist_source(str(cfg.path), cfg.path_column, cfg.label_columns, cfg.id_column)
    elif cfg.kind == "tar":
        src = tar_source(str(cfg.path))
    elif cfg.kind == "embeddings":
        return embeddings_source(cfg)
    else:
        raise InputError(f"source.kind: expected 'demo', 'folder', 'filelist', 'tar' or 'embeddings', got {cfg.kind!r}")
    return subset(src, cfg.limit) if cfg.limit else src


#: the path of an imported row with no image joined (`source.images` unset): no stage may read it
NO_IMAGE = ""
_EMBEDDINGS_SOURCES: dict[str, ImageSource] = {}


def embeddings_source(cfg: SourceConfig) -> ImageSource:
    """The rows of imported embeddings as a source: ids and labels from their files (`source.ids`,
    `source.labels`), joined by id to `source.images` when given (a row's path is its image there, its
    label the labels file's or else the image source's, its size and mtime the image's as listed: what
    `pixels_identity` keys the stages that read the pixels on); without images every path is `NO_IMAGE`.

    Without images it is remembered per config and ids/labels file state in this process: every stage
    asks for it, and 1M ids take seconds to read (a joined image source is listed anew, as every image
    source is). `InputError` naming `source.images` when some rows have no image there."""
    from alignet_core.io import embedding_sources

    a = embedding_sources.locate(cfg)
    files = [f for f in (a.ids, cfg.labels) if f]
    memo = json.dumps([cfg.model_dump(mode="json"), [embedding_sources.file_state(f) for f in files]], sort_keys=True)
    if memo in _EMBEDDINGS_SOURCES:
        return _EMBEDDINGS_SOURCES[memo]
    ids, labels = embedding_sources.ids_and_labels(cfg)
    desc = f"embeddings {cfg.path!r}"
    if cfg.images is None:
        records = tuple(ImageRecord(id=i, path=NO_IMAGE, label=(labels[r] or None) if labels else None)
                        for r, i in enumerate(ids))
    else:
        images = source_from_config(cfg.images)
        by_id = {r.id: r for r in images.records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise InputError(f"source.images: {len(missing)} of the {len(ids)} embedding ids have no image in "
                             f"{images.description}, e.g. {missing[:3]}; the ids (source.ids) must be that source's "
                             "image ids (a folder's: the path relative to its root)")
        records = tuple(ImageRecord(id=i, path=by_id[i].path,
                                    label=((labels[r] or None) if labels else by_id[i].label),
                                    fine=None if labels else by_id[i].fine, size=by_id[i].size,
                                    mtime_ns=by_id[i].mtime_ns) for r, i in enumerate(ids))
        desc += f" joined to {images.description}"
    src = ImageSource(records, description=desc)
    if cfg.images is None:
        _EMBEDDINGS_SOURCES[memo] = src
    return src


def has_images(cfg: SourceConfig) -> bool:
    """Whether the source's rows have pixels (every source but imported embeddings without `source.images`)."""
    return cfg.kind != "embeddings" or cfg.images is not None


#: the image sources whose listing (every image's id, size and mtime) is their identity (`io.listing`)
LISTED_KINDS = ("folder", "filelist", "tar")


def pixels_identity(cfg: SourceConfig) -> dict[str, Any]:
    """What identifies the pixels a stage reads (distill trains on them, evaluate embeds them): the source's
    identity (`source_identity`) and, for imported embeddings joined to a folder, file list or tar shards
    (`source.images`), the listing of the joined images: the sha256 of each row's image id, size and mtime
    in row order (`io.listing`). An image replaced, or its file touched, under the same id is then a new key
    for those stages, while the imported rows' key (embed) and the stages that read only rows keep theirs.
    A listed image source's own listing is already in the embed key, which every stage's key chains to.
    Costs one listing of `source.images` (a run plans each stage once). The stat is the identity here (no
    digests are kept for joined images): a `touch` is a new key too, never a stale one."""
    ident = source_identity(cfg)
    if cfg.kind == "embeddings" and cfg.images is not None and cfg.images.kind in LISTED_KINDS:
        ident["images_listing"] = listing_digest(source_from_config(cfg).records)
    return ident


def listing_digest(records: Sequence[ImageRecord]) -> str:
    """The sha256 hex of the records' (id, size, mtime_ns) rows in order: a listing's key (`io.listing`)."""
    h = hashlib.sha256()
    h.update("\n".join(f"{r.id}\t{r.size}\t{r.mtime_ns}" for r in records).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def source_identity(cfg: SourceConfig) -> dict[str, Any]:
    """What identifies a source's images in a content key: its config, plus the hash of the demo's
    metadata for the shipped set (a rebuilt demo set is new data), or for imported embeddings the
    sha256, shape and dtype of the array and the hashes of its ids and labels files
    (`embedding_sources.inspect_embeddings`, remembered per file state). The embeddings-only fields
    are left out of other sources' identities, so their keys stay as they were."""
    if cfg.kind != "embeddings":
        ident: dict[str, Any] = cfg.model_dump(exclude={"format", "dataset", "ids", "labels", "images"})
    else:
        from alignet_core.io import embedding_sources

        ident = cfg.model_dump(exclude={"path", "ids", "labels", "images"})
        info = embedding_sources.inspect_embeddings(cfg)
        ident["data"] = {k: v for k, v in info.provenance().items() if k != "path"}
        ident["images"] = None if cfg.images is None else source_identity(cfg.images)
    if cfg.kind == "demo":
        h = hashlib.sha256((demo_data_dir() / "metadata.csv").read_bytes())
        ident["data"] = h.hexdigest()
    return ident


def labels_identity(cfg: SourceConfig) -> str | None:
    """The sha256 of the source's class labels (each image's id, coarse and fine label, in source order) where
    the embed key does not already cover them: a CSV file list's label columns (`source.label_columns`, else
    its `label` column), read from the list alone (no image is stat'ed; remembered per list content in this
    process), or the labels of the images joined to imported embeddings that have no `source.labels`
    file (a CSV list's or tar shards' labels; the joined source is listed). None for a list without labels
    and for every other source, whose labels are in the embed key already: a folder's class is the first
    folder of each image's id (the listing), a tar member's `.cls`/`.txt` label lives in its shard, whose
    mtime is every member's fingerprint (the listing), the demo's metadata and an imported labels file are
    hashed by `source_identity`. The stages that read labels put it in their keys (`labels_entry`): an
    edited label is a new key for them, while the embed key (the pixels) stays."""
    if cfg.kind == "filelist" and str(cfg.path).lower().endswith(".csv"):
        fs, lpath = fsspec.core.url_to_fs(str(cfg.path))
        digest = store.file_sha256(str(cfg.path)) if fs.isfile(lpath) else None
        return _csv_labels_identity(json.dumps([cfg.model_dump(mode="json"), digest]))
    joined = cfg.images if cfg.kind == "embeddings" and cfg.labels is None else None
    if joined is not None and joined.kind == "filelist":
        return labels_identity(joined)
    if joined is not None and joined.kind == "tar":
        return _labels_digest([(r.id, r.label, r.fine) for r in source_from_config(joined).records])
    return None


@functools.lru_cache(maxsize=16)
def _csv_labels_identity(state: str) -> str | None:
    """`labels_identity` of a CSV file list, by its config and content (`state`: JSON of the config and the
    list file's sha256; a missing list is the list reader's `InputError`)."""
    from alignet_core.io.source_config import SourceConfig

    cfg = SourceConfig.model_validate(json.loads(state)[0])
    _, entries = _filelist_entries(str(cfg.path), cfg.path_column, cfg.label_columns, cfg.id_column)
    if cfg.limit and entries:
        entries = [entries[i] for i in subset_rows(len(entries), cfg.limit)]
    return _labels_digest([(image_id, coarse, fine) for image_id, _, coarse, fine in entries])


def _labels_digest(rows: list[tuple[str, str | None, str | None]]) -> str | None:
    """sha256 hex of (id, coarse, fine) rows in order; None when no row has a label."""
    if not any(coarse or fine for _, coarse, fine in rows):
        return None
    text = "\n".join(f"{i}\t{coarse or ''}\t{fine or ''}" for i, coarse, fine in rows)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def labels_entry(cfg: SourceConfig) -> dict[str, str]:
    """`{"labels": labels_identity(cfg)}` for a stage key's config, or `{}` where it is None (the keys of
    sources whose labels the embed key covers stay as they were)."""
    ident = labels_identity(cfg)
    return {} if ident is None else {"labels": ident}


def subset(src: ImageSource, limit: int) -> ImageSource:
    """`limit` evenly spaced records of a source (all of it when it is smaller); stable order."""
    if limit >= len(src):
        return src
    return ImageSource(tuple(src.records[i] for i in subset_rows(len(src), limit)),
                       f"{src.description} (every ~{len(src) / limit:.1f}th, {limit})")


def subset_rows(n: int, limit: int) -> np.ndarray:
    """(min(n, limit),) int: the rows of `subset`, `limit` evenly spaced of `n` (all of them when fewer)."""
    if limit >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, limit).round().astype(int)




def check_same_images(stage: str, store_url: str, src: ImageSource, listing_key: str | None = None) -> None:
    """`InputError` in one line, naming `stage`, the store and the counts, when the store at `store_url` (an
    embedding or transformed store: `ids` (n,) str) does not hold the images `src` lists, in its order.

    Every stage after embed reads rows by position, so a store of another listing (an image added, removed
    or replaced since it was made) would misalign every row: refused before the stage's work, never a
    numpy shape error deep inside it. Cost: none for a store made from the listing `listing_key` (its
    `listing` attribute), else reading the store's ids (a second at a million rows)."""
    import zarr

    try:
        g = zarr.open_group(store_url, mode="r")
        if listing_key is not None and g.attrs.get("listing") == listing_key and g["ids"].shape == (len(src),):
            return
        ids = np.asarray(np.asarray(g["ids"][:]).tolist(), dtype=str)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return  # not an id-keyed store: nothing to compare
    now = src.ids()
    if len(ids) == len(now) and np.array_equal(ids, now):
        return
    held, listed = set(ids.tolist()), set(now.tolist())
    added, removed = [i for i in now.tolist() if i not in held], [i for i in ids.tolist() if i not in listed]
    what = (f"{len(added)} added (e.g. {added[:3]}), {len(removed)} removed (e.g. {removed[:3]})"
            if added or removed else "the same ids in another order")
    raise InputError(f"{stage}: the store {store_url!r} holds {len(ids)} images but the source ({src.description}) "
                     f"lists {len(now)} now: {what}; recompute the stages before {stage} for this listing "
                     "(`alignet run`, or `alignet embed` first)")
