"""Stage 0, embed: the teacher's pooled pre-logits of every image → `<dir>/embeddings.zarr`.

In: the image source (`source`) and the teacher (`embed`). Out: an embedding store
(`io.embedding_store`), rows in source order. The key covers the source's identity, the embed
config except `devices` (which devices of one kind run the extraction changes no output) and the
compute identity: GPU rows are computed under bf16 autocast, CPU rows in float32, so a store made
on one is never served for the other.

A folder, file list or tar source is what it holds: its identity includes the run's listing (every
image's id, size and mtime_ns, `io.listing`), so an added, replaced or removed image is a new key and
an unchanged source a cache hit whose only cost is the listing. A new key's store starts from the
previous store of the same lineage (the key without the listing): unchanged rows are copied, only added
and changed images embedded (`embed.reuse`); `EmbedMetrics.changes` says what changed.

With `source.kind: embeddings` the rows are imported instead (`importer`): the key covers the
array's identity (sha256, shape, dtype, ids and labels hashes: `sources.source_identity`) and the
store's dtype and chunking; the teacher settings (`embed.model`, `weights`, ...) do not apply.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.embed.importer import checked_import, import_embeddings
from alignet_core.errors import InputError
from alignet_core.hardware import ComputeIdentity, compute_identity, resolve_device, resolve_devices
from alignet_core.io import sources, store
from alignet_core.io.listing import (
    DIGEST_ARRAY,
    EXAMPLES,
    MTIME_ARRAY,
    SIZE_ARRAY,
    SourceListing,
    compare,
    content_digest,
    listing_of,
)
from alignet_core.runtime.runner import Record, StageMetrics, StageOutput, StagePlan, finish, once, plan_stage

if TYPE_CHECKING:
    from alignet_core.embed.reuse import RowReuse

STORE = "embeddings.zarr"

log = logging.getLogger(__name__)


class SkippedImage(Record):
    """An image that could not be decoded: its row stays zero and invalid."""

    id: str
    path: str
    reason: str


class ImportedArray(Record):
    """Where imported rows came from (`source.kind: embeddings`)."""

    path: str
    format: str
    dataset: str | None
    sha256: str
    shape: list[int]
    dtype: str
    ids_sha256: str
    labels_sha256: str | None


class SourceChanges(Record):
    """What changed in the source since the previous store of the same lineage (`embed.reuse`): images
    added, changed (same id, other bytes, or other size or mtime where the bytes' digest is unknown) and
    removed, how many rows were reused, of those how many touched (other size or mtime, same bytes: reused),
    a few example ids of each, and the seconds the run's listing took. `previous` is that store's key (None:
    the first store of its lineage, every image added)."""

    previous: str | None
    listing: str
    listing_seconds: float
    added: int
    changed: int
    removed: int
    reused: int
    added_examples: list[str] = []
    changed_examples: list[str] = []
    removed_examples: list[str] = []
    touched: int = 0
    touched_examples: list[str] = []


class EmbedMetrics(StageMetrics):
    n_images: int
    n_valid: int
    dim: int
    skipped: list[SkippedImage]
    imported: ImportedArray | None = None  # set when the rows were imported, not extracted
    changes: SourceChanges | None = None  # a listed source (folder, file list, tar): what changed, what was reused

    def teacher(self, model: str) -> str:
        """Who made the rows: the timm model, or 'imported: <path>'."""
        return model if self.imported is None else f"imported: {self.imported.path}"

    def skipped_fraction(self) -> float:
        return len(self.skipped) / max(self.n_images, 1)

    def skipped_reasons(self) -> dict[str, int]:
        """How many images were skipped for each reason (the file's own path taken out), most common first."""
        counts = Counter(s.reason.replace(s.path, "<file>")[:160] for s in self.skipped)
        return dict(counts.most_common())


class EmbedOutput(StageOutput):
    metrics: EmbedMetrics


def embed_compute(cfg: PipelineConfig) -> ComputeIdentity:
    """Where the rows are computed: the first of `embed.devices` (all of one kind), else `device`."""
    device = resolve_devices(cfg.embed.devices)[0] if cfg.embed.devices else resolve_device(cfg.device)
    return compute_identity(device)


#: the source kinds whose listing (every image's id, size and mtime) is part of the key (`io.listing`)
LISTED_KINDS = ("folder", "filelist", "tar")


def _embed_conf(cfg: PipelineConfig, compute: ComputeIdentity) -> dict:
    """The key's config of an extraction, the listing left out: its *lineage* (`embed.reuse`)."""
    return {"source": sources.source_identity(cfg.source), "embed": cfg.embed.key_dump(),
            "compute": dataclasses.asdict(compute)}


def plan_embed(cfg: PipelineConfig, compute: ComputeIdentity | None = None,
               listing: SourceListing | None = None) -> StagePlan:
    """The embed stage's plan; `compute` defaults to this machine's (`embed_compute`). For a folder, file
    list or tar shards the key covers `listing` (the source is what it holds: an added, replaced or
    removed image is a new key), listed here when not given (a run passes its context's one listing)."""
    if cfg.source.kind == "embeddings":
        conf = {"source": sources.source_identity(cfg.source),
                "embed": cfg.embed.model_dump(include={"store_dtype", "chunk_rows"})}
        return plan_stage(cfg.root, "embed", conf, [], __name__)
    conf = _embed_conf(cfg, compute or embed_compute(cfg))
    if cfg.source.kind in LISTED_KINDS:
        listing = listing or listing_of(sources.source_from_config(cfg.source))
        conf["source"]["listing"] = listing.key
    return plan_stage(cfg.root, "embed", conf, [], __name__)


def embed_plan(ctx: RunContext) -> StagePlan:
    """The run's one plan of the embed stage (its listing from the run context)."""
    return ctx.plan(plan_embed, None, ctx.listing if ctx.cfg.source.kind in LISTED_KINDS else None)


def run_embed(ctx: RunContext, progress: Callable[[int, int], None] | None = None) -> EmbedOutput:
    """Embed every image (resuming a killed run); `progress(done_rows, total_rows)` after each chunk.

    `InputError` when more than `embed.max_skipped_fraction` of the images were skipped; the store is kept
    (finished), so a rerun with the images fixed (a new source key) or a higher limit loses nothing."""
    cfg = ctx.cfg
    if cfg.source.kind == "embeddings":
        checked_import(cfg)  # a bad array or store dtype is refused before anything is written
    plan = embed_plan(ctx)
    out = once(plan, EmbedOutput, lambda: _embed(ctx, plan, progress), cfg.lock_timeout)
    check_skipped(out.metrics, cfg.embed.max_skipped_fraction)
    return out


def check_skipped(m: EmbedMetrics, limit: float) -> None:
    """`InputError` naming the count, the fraction, the reasons and a few files when more than `limit` of
    the images were skipped."""
    if not m.skipped or m.skipped_fraction() <= limit:
        return
    reasons = "; ".join(f"{n} × {r}" for r, n in list(m.skipped_reasons().items())[:3])
    examples = ", ".join(s.path for s in m.skipped[:3])
    raise InputError(
        f"embed.max_skipped_fraction: {len(m.skipped)} of {m.n_images} images ({100 * m.skipped_fraction():.1f}%) "
        f"could not be read or decoded, more than the limit {100 * limit:g}% (reasons: {reasons}; e.g. {examples}). "
        "Fix or remove them, or raise embed.max_skipped_fraction; the embeddings of the others are kept"
    )


def _embed(ctx: RunContext, plan: StagePlan, progress: Callable[[int, int], None] | None) -> EmbedOutput:
    """The stage's work, under its lock."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    url = store.join(plan.dir, STORE)
    changes = None
    if cfg.source.kind == "embeddings":
        info = import_embeddings(cfg, ctx.source.ids(), url, progress=progress)
        config: dict = {"embed": cfg.embed.model_dump(include={"store_dtype", "chunk_rows"})}
    else:
        src = ctx.source
        from alignet_core.embed.extract import extract_embeddings  # torch, timm: only when images are embedded

        config = {"embed": cfg.embed.model_dump()}
        fingerprints = reuse = None
        if cfg.source.kind in LISTED_KINDS:
            listing = ctx.listing
            lineage = store.content_key("embed-lineage", _embed_conf(cfg, embed_compute(cfg)), [], plan.code_version)
            config |= {"lineage": lineage, "listing": listing.key}
            fingerprints = (listing.sizes, listing.mtimes)
            previous = previous_store(cfg.root, lineage, plan.key)
            reuse, changes = _changes(src, listing, previous)
            log.info("embed: source %s since %s: %d added, %d changed, %d removed; %d reused, %d of them touched (same "
                     "bytes, new mtime; listing %s, %.3g s)", src.description,
                     changes.previous or "nothing (the first store of its lineage)", changes.added, changes.changed,
                     changes.removed, changes.reused, changes.touched, changes.listing[:12], changes.listing_seconds)
        info = extract_embeddings(src, cfg.embed, url, resolve_device(cfg.device), progress=progress,
                                  fingerprints=fingerprints, reuse=reuse)
        if changes is not None:
            zarr_attrs(url)["listing"] = changes.listing
    metrics = EmbedMetrics(n_images=info["n"], n_valid=info["n_valid"], dim=info["dim"],
                           skipped=[SkippedImage(**s) for s in info["skipped"]], imported=info.get("imported"),
                           changes=changes, seconds=round(time.perf_counter() - t0, 2))
    return finish(plan, EmbedOutput, url, metrics, config, [])


def zarr_attrs(url: str):
    """The writable attributes of the store at `url`."""
    import zarr

    return zarr.open_group(url, mode="r+").attrs


def previous_store(root: str, lineage: str, key: str) -> tuple[str, str] | None:
    """(key, store url) of the newest finished embed store of `lineage` other than `key`, or None."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(store.join(root, "stages", "embed"))
    if not fs.exists(base):
        return None
    found = []
    for d in fs.ls(base, detail=False):
        other = d.rstrip("/").rsplit("/", 1)[-1]
        dir_url = store.join(root, "stages", "embed", other)
        if other == key or not store.is_complete(dir_url):
            continue
        m = store.read_manifest(dir_url)
        if (m.get("config") or {}).get("lineage") != lineage:
            continue
        mtime = fs.info(f"{d.rstrip('/')}/{store.MANIFEST}").get("mtime") or 0
        found.append((float(mtime), other, store.join(dir_url, STORE)))
    if not found:
        return None
    _, other, url = max(found)
    return other, url


def _changes(src: sources.ImageSource, listing: SourceListing, previous: tuple[str, str] | None
             ) -> tuple[RowReuse | None, SourceChanges]:
    """The rows to reuse from `previous` (key, store url) and what changed since it (everything added
    when there is none, or when it keeps no fingerprints). A candidate (same id, other size or mtime) is
    read and hashed when the previous store knows its row's content digest: the same bytes are reused."""
    from alignet_core.embed.reuse import RowReuse
    from alignet_core.io import embedding_store

    k = EXAMPLES
    if previous is not None:
        g = embedding_store.open_embeddings(previous[1])
        if SIZE_ARRAY in g and MTIME_ARRAY in g:
            digests = g[DIGEST_ARRAY][:] if DIGEST_ARRAY in g else None  # older stores: the fingerprint alone
            c = compare(g["ids"][:], g[SIZE_ARRAY][:], g[MTIME_ARRAY][:], src, listing, digests, content_digest)
            reuse = RowReuse(previous[1], c.new_rows, c.old_rows) if c.unchanged else None
            return reuse, SourceChanges(
                previous=previous[0], listing=listing.key, listing_seconds=listing.seconds, added=len(c.added),
                changed=len(c.changed), removed=len(c.removed), reused=c.unchanged, added_examples=c.added[:k],
                changed_examples=c.changed[:k], removed_examples=c.removed[:k], touched=len(c.touched),
                touched_examples=c.touched[:k])
    ids = [r.id for r in src.records[:k]]
    return None, SourceChanges(previous=None, listing=listing.key, listing_seconds=listing.seconds, added=len(src),
                               changed=0, removed=0, reused=0, added_examples=ids)
