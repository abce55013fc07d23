"""A source is what it holds (issue 35): a folder, file list or tar shards is keyed by its listing (every
image's id, size and mtime), a regeneration embeds only added and changed images and reuses every other
row, and what changed is reported. Real stores, the real tiny timm model, real emoji images."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from alignet_core.config import parse_config
from alignet_core.context import RunContext
from alignet_core.errors import InputError
from alignet_core.io.sources import ImageSource, check_same_images
from tests.embed._embed import demo40  # noqa: F401 (fixture)

EMBED = {"model": "test_resnet", "weights": None, "chunk_rows": 8, "batch_size": 4}


def _folder(tmp_path: Path, demo40: ImageSource, n: int = 40) -> Path:
    """`n` emoji in two class folders (a/, b/)."""
    folder = tmp_path / "images"
    for k, rec in enumerate(demo40.records[:n]):
        (folder / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, folder / "ab"[k % 2] / Path(rec.path).name)
    return folder


def _cfg(tmp_path: Path, source: dict, **embed: object):
    return parse_config({"root": str(tmp_path / "root"), "device": "cpu", "source": source, "cluster": {"k": 2},
                         "embed": {**EMBED, **embed}})


def _rows(url: str) -> dict[str, np.ndarray]:
    g = zarr.open_group(url, mode="r")
    ids = [str(i) for i in np.asarray(g["ids"][:]).tolist()]
    return {i: np.asarray(g["embeddings"][r], dtype=np.float32) for r, i in enumerate(ids)}


def _embed(cfg):
    from alignet_core.embed.stage import run_embed

    return run_embed(RunContext.of(cfg))


def _replace(path: Path, other: Path) -> None:
    """New bytes under the same name (a later mtime, as a copy gives)."""
    before = path.stat().st_mtime_ns
    shutil.copy(other, path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_a_folder_regeneration_embeds_only_what_changed(demo40: ImageSource, tmp_path: Path) -> None:
    """The operator's case: 40 images, then one added (41 rows, a new key, 40 reused), one replaced (its new
    bytes embedded, its row changes) and one removed; every unchanged row equals a full recompute's, and an
    unchanged folder is the same key (a cache hit)."""
    folder = _folder(tmp_path, demo40, 40)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)})
    first = _embed(cfg)
    assert first.metrics.n_images == 40 and first.metrics.changes.previous is None
    assert first.metrics.changes.added == 40
    assert _embed(cfg).key == first.key  # nothing changed: the same key, reused

    from alignet_core.io.sources import demo_source

    spare = [r for r in demo_source().records[2000 - 200 :: 7]][:2]
    shutil.copy(spare[0].path, folder / "a" / "new.png")
    grown = _embed(cfg)
    c = grown.metrics.changes
    assert grown.key != first.key and grown.metrics.n_images == 41
    assert (c.previous, c.added, c.changed, c.removed, c.reused) == (first.key, 1, 0, 0, 40)
    assert c.added_examples == ["a/new.png"]
    from alignet_core.embed.render import change_rows, embed_rows, report_section

    section = report_section(grown)  # report.md's section; summary.json carries the same record
    assert section.startswith("## Images") and "1 added (e.g. `a/new.png`); 0 changed; 0 removed since the " \
        f"previous store `{first.key}`; 40 embeddings reused, 1 computed" in section
    assert change_rows(c)[0] == {"change": "added", "images": 1, "examples": "a/new.png"}
    assert embed_rows(grown)[0]["added"] == 1

    victim = min((folder / "b").iterdir())
    _replace(victim, Path(spare[1].path))
    gone = sorted((folder / "a").iterdir())[1]
    gone.unlink()
    changed = _embed(cfg)
    c = changed.metrics.changes
    assert (c.previous, c.added, c.changed, c.removed, c.reused) == (grown.key, 0, 1, 1, 39)
    assert c.changed_examples == [f"b/{victim.name}"] and c.removed_examples == [f"a/{gone.name}"]

    # the same rows as a full recompute (another root: nothing to reuse)
    full = _embed(_cfg(tmp_path / "full", {"kind": "folder", "path": str(folder)}))
    assert full.metrics.changes.reused == 0 and full.key == changed.key
    inc, ref, old = _rows(changed.artifact), _rows(full.artifact), _rows(first.artifact)
    assert list(inc) == list(ref)
    for i in ref:
        np.testing.assert_allclose(inc[i], ref[i], rtol=1e-2, atol=1e-3)
    assert not np.allclose(inc[f"b/{victim.name}"], old[f"b/{victim.name}"], atol=1e-3)  # the new bytes embedded
    g = zarr.open_group(changed.artifact, mode="r")
    assert g.attrs["listing"] == c.listing and g["source_size"].shape == (40,)


def write_tar(shard: Path, folder: Path, members: list[str]) -> None:
    """A tar shard of `members` (files of `folder`) as `0000.png`, `0001.png`, ... with fixed header mtimes."""
    with tarfile.open(shard, "w") as tf:
        for k, name in enumerate(members):
            data = (folder / name).read_bytes()
            info = tarfile.TarInfo(f"{k:04d}.png")
            info.size, info.mtime = len(data), 1_700_000_000 + k
            tf.addfile(info, io.BytesIO(data))


def test_a_file_list_and_tar_shards_are_keyed_by_what_they_hold(demo40: ImageSource, tmp_path: Path) -> None:
    """A file list: a listed file replaced → a new key, one row recomputed. Tar shards: a shard rewritten
    with one more member → a new key, the others reused (a reordering of the list reuses every row)."""
    folder = _folder(tmp_path, demo40, 12)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    (folder / "list.txt").write_text("\n".join(names) + "\n")
    cfg = _cfg(tmp_path, {"kind": "filelist", "path": str(folder / "list.txt")})
    first = _embed(cfg)
    _replace(folder / names[3], folder / names[4])
    second = _embed(cfg)
    c = second.metrics.changes
    assert second.key != first.key and (c.added, c.changed, c.removed, c.reused) == (0, 1, 0, 11)
    (folder / "list.txt").write_text("\n".join(reversed(names)) + "\n")
    third = _embed(cfg)
    c = third.metrics.changes
    assert third.key != second.key and (c.added, c.changed, c.removed, c.reused) == (0, 0, 0, 12)
    a, b = _rows(second.artifact), _rows(third.artifact)
    assert all(np.array_equal(a[i], b[i]) for i in a)  # reordered: every row copied, exactly

    shard = tmp_path / "shards" / "s-000.tar"
    shard.parent.mkdir()

    write_tar(shard, folder, names[:6])
    tcfg = _cfg(tmp_path, {"kind": "tar", "path": str(shard)})
    t1 = _embed(tcfg)
    write_tar(shard, folder, names[:7])
    t2 = _embed(tcfg)
    c = t2.metrics.changes
    assert t2.key != t1.key and t2.metrics.n_images == 7
    assert (c.added, c.changed, c.removed, c.reused) == (1, 0, 0, 6) and c.added_examples == ["s-000/0006"]


def test_a_file_changed_after_the_listing_is_refused_not_embedded_as_listed(demo40: ImageSource,
                                                                            tmp_path: Path) -> None:
    """An image rewritten between the listing and its read (or while read): its size/mtime differ from the
    listing's, so it is skipped with the reason, and the next run lists and embeds its new bytes."""
    folder = _folder(tmp_path, demo40, 10)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)}, max_skipped_fraction=0.2)
    ctx = RunContext.of(cfg)
    ctx.listing  # noqa: B018 - listed now
    victim = min((folder / "a").iterdir())
    _replace(victim, min((folder / "b").iterdir()))
    from alignet_core.embed.stage import run_embed

    out = run_embed(ctx)
    assert [s.id for s in out.metrics.skipped] == [f"a/{victim.name}"]
    assert "changed while the run read it" in out.metrics.skipped[0].reason
    again = _embed(cfg)
    c = again.metrics.changes
    assert again.metrics.n_valid == 10 and (c.changed, c.reused) == (1, 9)


def test_a_store_of_another_listing_is_refused_in_one_line(demo40: ImageSource, tmp_path: Path) -> None:
    """The shared check before every later stage: counts and examples, the stage named, one line."""
    folder = _folder(tmp_path, demo40, 10)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)})
    out = _embed(cfg)
    same = RunContext.of(cfg)
    check_same_images("transform", out.artifact, same.source, same.listing.key)  # its own listing: no read
    check_same_images("transform", out.artifact, same.source)  # the ids read and compared
    shutil.copy(demo40.records[20].path, folder / "a" / "late.png")
    ctx = RunContext.of(cfg)
    with pytest.raises(InputError) as err:
        check_same_images("transform", out.artifact, ctx.source, ctx.listing.key)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("transform: the store") and "holds 10 images" in msg
    assert "lists 11 now: 1 added (e.g. ['a/late.png']), 0 removed" in msg


@pytest.mark.slow  # two worker processes start and import torch: ~25 s on 2 cores
def test_two_cpu_workers_embed_only_the_changed_rows_into_the_single_process_store(
        demo40: ImageSource, tmp_path: Path, one_torch_thread: None) -> None:  # noqa: F811
    """The rows to compute are the store's (`reused`, written by the prefill): two Dask worker processes
    (devices ['cpu', 'cpu']) given the same previous store make the very store one process makes."""
    from alignet_core.embed.extract import extract_embeddings
    from alignet_core.embed.reuse import RowReuse
    from alignet_core.io.listing import compare, listing_of
    from alignet_core.io.sources import folder_source
    from tests.embed._embed import CPU, TINY, _assert_same_store

    folder = _folder(tmp_path, demo40, 21)
    cfg = TINY.model_copy(update={"chunk_rows": 4, "batch_size": 3, "num_workers": 1})
    src = folder_source(str(folder))
    first = listing_of(src)
    old = str(tmp_path / "old.zarr")
    extract_embeddings(src, cfg, old, CPU, fingerprints=(first.sizes, first.mtimes))
    shutil.copy(demo40.records[30].path, folder / "a" / "new.png")
    _replace(min((folder / "b").iterdir()), Path(demo40.records[31].path))
    src = folder_source(str(folder))
    now = listing_of(src)
    g = zarr.open_group(old, mode="r")
    c = compare(g["ids"][:], g["source_size"][:], g["source_mtime_ns"][:], src, now)
    assert (len(c.added), len(c.changed), c.unchanged) == (1, 1, 20)
    reuse = RowReuse(old, c.new_rows, c.old_rows)
    single, two = str(tmp_path / "single.zarr"), str(tmp_path / "two.zarr")
    extract_embeddings(src, cfg, single, CPU, fingerprints=(now.sizes, now.mtimes), reuse=reuse)
    result = extract_embeddings(src, cfg.model_copy(update={"devices": ["cpu", "cpu"]}), two, CPU,
                                fingerprints=(now.sizes, now.mtimes), reuse=reuse)
    assert result["n"] == 22 and result["n_valid"] == 22
    _assert_same_store(two, single)
    assert zarr.open_group(two, mode="r")["reused"][:].sum() == 20
    # every row's content digest: the embedded ones by the worker that read them, the reused ones copied
    digests = [np.asarray(zarr.open_group(u, mode="r")["source_sha256"][:]) for u in (two, single)]
    assert np.array_equal(*digests) and digests[0].any(axis=1).all()


def _touch(path: Path) -> None:
    """A new mtime, the same bytes (what `touch` or a copy that kept the bytes does)."""
    after = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(after, after))


def test_a_touched_image_is_reused_and_new_bytes_are_embedded(demo40: ImageSource,  # noqa: F811
                                                              tmp_path: Path) -> None:
    """Each row keeps the sha256 of the bytes it was embedded from: a `touch` (a new mtime, the same bytes)
    makes the image a candidate, hashed and found unchanged: nothing embedded, every row copied exactly,
    counted as touched, not changed; new bytes under the same name are embedded."""
    folder = _folder(tmp_path, demo40, 10)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)})
    first = _embed(cfg)
    g = zarr.open_group(first.artifact, mode="r")
    victim = min((folder / "a").iterdir())
    row = [str(i) for i in np.asarray(g["ids"][:]).tolist()].index(f"a/{victim.name}")
    import hashlib

    assert bytes(np.asarray(g["source_sha256"][row])) == hashlib.sha256(victim.read_bytes()).digest()

    _touch(victim)
    touched = _embed(cfg)
    c = touched.metrics.changes
    assert touched.key != first.key  # another listing: another store, made of copies
    assert (c.added, c.changed, c.removed, c.reused, c.touched) == (0, 0, 0, 10, 1)
    assert c.touched_examples == [f"a/{victim.name}"]
    t = zarr.open_group(touched.artifact, mode="r")
    assert np.asarray(t["reused"][:]).all()  # not one image embedded
    assert np.array_equal(np.asarray(t["embeddings"][:]), np.asarray(g["embeddings"][:]))
    assert np.array_equal(np.asarray(t["source_sha256"][:]), np.asarray(g["source_sha256"][:]))
    assert int(t["source_mtime_ns"][row]) == victim.stat().st_mtime_ns  # the new fingerprint kept
    from alignet_core.embed.render import change_line

    assert "10 embeddings reused (1 of them touched: a new mtime, the same bytes" in change_line(c)

    _replace(victim, min((folder / "b").iterdir()))  # new bytes under the same name
    rewritten = _embed(cfg)
    c = rewritten.metrics.changes
    assert (c.changed, c.reused, c.touched) == (1, 9, 0) and c.changed_examples == [f"a/{victim.name}"]
    r = zarr.open_group(rewritten.artifact, mode="r")
    assert not np.asarray(r["reused"][row])
    assert bytes(np.asarray(r["source_sha256"][row])) == hashlib.sha256(victim.read_bytes()).digest()
    assert not np.allclose(np.asarray(r["embeddings"][row], dtype=np.float32),
                           np.asarray(g["embeddings"][row], dtype=np.float32), atol=1e-3)


def test_a_store_without_digests_falls_back_to_the_fingerprint(demo40: ImageSource,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """A store made before the content digests (no `source_sha256`): a touched image is a changed one,
    re-embedded, as before; the new store has the digests, so the next touch is free."""
    folder = _folder(tmp_path, demo40, 6)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)})
    first = _embed(cfg)
    shutil.rmtree(Path(first.artifact) / "source_sha256")
    assert "source_sha256" not in zarr.open_group(first.artifact, mode="r")
    victim = min((folder / "b").iterdir())
    _touch(victim)
    second = _embed(cfg)
    c = second.metrics.changes
    assert (c.changed, c.reused, c.touched) == (1, 5, 0)
    g = zarr.open_group(second.artifact, mode="r")
    known = np.asarray(g["source_sha256"][:]).any(axis=1)
    assert not known[np.asarray(g["reused"][:])].any()  # unknown before: still unknown
    _touch(victim)
    c = _embed(cfg).metrics.changes
    assert (c.changed, c.reused, c.touched) == (0, 6, 1)


def test_the_transformed_store_carries_the_listing(demo40: ImageSource, tmp_path: Path) -> None:  # noqa: F811
    """The transformed store keeps the embed store's `listing` attribute, so the check before k-means and
    sampling is free (it does not read the ids: shown by removing them) and refuses another listing."""
    import torch

    from alignet_core.transform.affine import AffineTransform, apply_transform_to_store

    folder = _folder(tmp_path, demo40, 10)
    cfg = _cfg(tmp_path, {"kind": "folder", "path": str(folder)})
    out = _embed(cfg)
    p = zarr.open_group(out.artifact, mode="r")["embeddings"].shape[1]
    tf = AffineTransform(mean=0.0, std=1.0, weight=np.eye(p, dtype=np.float32), bias=np.zeros(p, dtype=np.float32))
    url = str(tmp_path / "transformed.zarr")
    apply_transform_to_store(out.artifact, url, tf, 4, torch.device("cpu"))
    listing = zarr.open_group(out.artifact, mode="r").attrs["listing"]
    assert zarr.open_group(url, mode="r").attrs["listing"] == listing == out.metrics.changes.listing
    ctx = RunContext.of(cfg)
    assert ctx.listing.key == listing
    ids_data = [c for c in (Path(url) / "ids").rglob("*") if c.is_file() and c.name != "zarr.json"]
    assert ids_data
    for c in ids_data:
        c.unlink()  # the ids' values gone, their shape kept: only the attribute can pass the check
    check_same_images("cluster", url, ctx.source, ctx.listing.key)
    shutil.copy(demo40.records[20].path, folder / "a" / "late.png")
    ctx = RunContext.of(cfg)
    with pytest.raises(InputError, match="^cluster: the store .* holds 10 images but .* lists 11 now"):
        check_same_images("cluster", url, ctx.source, ctx.listing.key)


def test_a_tar_member_rewritten_at_the_same_size_and_header_mtime_is_seen(demo40: ImageSource,  # noqa: F811
                                                                          tmp_path: Path) -> None:
    """A shard rewritten with one member's bytes changed but its size and header mtime kept: the members'
    fingerprints carry the shard file's mtime, so each is a candidate; the digests find the one whose bytes
    changed (embedded) and the others the same (reused, touched)."""
    folder = _folder(tmp_path, demo40, 6)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))
    shard = tmp_path / "shards" / "s-000.tar"
    shard.parent.mkdir()
    write_tar(shard, folder, names)
    cfg = _cfg(tmp_path, {"kind": "tar", "path": str(shard)})
    first = _embed(cfg)

    sizes = {n: (folder / n).stat().st_size for n in names}
    big, small = max(names, key=sizes.get), min(names, key=sizes.get)
    # `big` becomes `small`'s picture, zero-padded to its own size (a PNG decoder stops at IEND)
    (folder / big).write_bytes((folder / small).read_bytes().ljust(sizes[big], b"\0"))
    before = shard.stat().st_mtime_ns
    write_tar(shard, folder, names)  # the same header mtimes (write_tar fixes them) and sizes
    os.utime(shard, ns=(before + 10**9, before + 10**9))
    with tarfile.open(shard) as tf:
        assert [m.size for m in tf.getmembers()] == [sizes[n] for n in names]
    second = _embed(cfg)
    c = second.metrics.changes
    changed_id = f"s-000/{names.index(big):04d}"
    assert second.key != first.key
    assert (c.added, c.changed, c.removed, c.reused, c.touched) == (0, 1, 0, 5, 5)
    assert c.changed_examples == [changed_id]
    a, b = _rows(first.artifact), _rows(second.artifact)
    assert not np.allclose(a[changed_id], b[changed_id], atol=1e-3)
    assert all(np.array_equal(a[i], b[i]) for i in a if i != changed_id)
