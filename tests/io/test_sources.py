"""sources.py: every source kind gives stable ids and labels; every odd image decodes to 8-bit RGB."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from alignet_core.io.source_config import SourceConfig
from alignet_core.errors import InputError
from alignet_core.io.images import load_image
from alignet_core.io.sources import (
    ImageRecord,
    ImageSource,
    demo_metadata,
    demo_source,
    filelist_source,
    folder_source,
    source_from_config,
    tar_source,
)


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """root/{cat,dog}/*.{png,jpg} plus files a source must ignore."""
    root = tmp_path / "root"
    _png(root / "dog" / "b.png")
    _png(root / "cat" / "z.png")
    _png(root / "cat" / "a.png")
    PIL.Image.new("RGB", (8, 8), "blue").save(root / "dog" / "c.JPG")
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / "cat" / ".hidden.png")
    return root


# ----------------------------------------------------------------------------- demo
def test_demo_source_is_the_emoji_set_in_metadata_order() -> None:
    rows = demo_metadata()
    src = demo_source()
    assert len(src) == len(rows) == 1906
    assert list(src.ids()) == [r["id"] for r in rows]
    assert [int(r["sort_order"]) for r in rows] == sorted(int(r["sort_order"]) for r in rows)
    assert len(set(src.labels())) == 9
    assert len(set(demo_source("subcategory").labels())) == 98
    assert all(Path(p).is_file() for p in src.paths()[:20])
    first = src.records[0]
    assert first.id == Path(first.path).stem and first.label == rows[0]["category"]
    img = load_image(first.path)
    assert img.mode == "RGB" and img.size == (64, 64)
    with pytest.raises(InputError, match="label_level"):
        demo_source("genus")


# ----------------------------------------------------------------------------- folder
def test_folder_source_sorted_ids_and_folder_labels(tree: Path) -> None:
    src = folder_source(str(tree))
    assert list(src.ids()) == ["cat/a.png", "cat/z.png", "dog/b.png", "dog/c.JPG"]
    assert list(src.labels()) == ["cat", "cat", "dog", "dog"]
    assert src.paths()[0] == str(tree / "cat" / "a.png")
    assert src.ids().dtype.kind == "U"
    # ids do not depend on where the tree lives
    moved = tree.parent / "moved"
    tree.rename(moved)
    assert list(folder_source(str(moved)).ids()) == list(src.ids())


def test_folder_source_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        folder_source(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        folder_source(str(tmp_path / "empty"))


def test_folder_source_reads_a_file_url(tree: Path) -> None:
    src = folder_source(f"file://{tree}")
    assert list(src.ids()) == ["cat/a.png", "cat/z.png", "dog/b.png", "dog/c.JPG"]
    assert load_image(src.paths()[0]).size == (8, 6)


# ----------------------------------------------------------------------------- file lists
def test_filelist_csv_with_labels(tree: Path) -> None:
    (tree / "list.csv").write_text("path,label\ndog/b.png,good boy\ncat/a.png,\n" + f"{tree}/cat/z.png,cat\n")
    src = filelist_source(str(tree / "list.csv"))
    assert list(src.ids()) == ["dog/b.png", "cat/a.png", "cat/z.png"]  # file order, ids relative
    assert list(src.labels()) == ["good boy", "", "cat"]
    assert src.records[1].label is None
    assert src.paths()[0] == str(tree / "dog" / "b.png")
    assert load_image(src.paths()[2]).mode == "RGB"


def test_filelist_txt_skips_blank_and_comment_lines(tree: Path) -> None:
    (tree / "sub").mkdir()
    (tree / "list.txt").write_text("# images\n\ndog/b.png\n./cat/a.png\n")
    src = filelist_source(str(tree / "list.txt"))
    assert list(src.ids()) == ["dog/b.png", "cat/a.png"]
    assert list(src.labels()) == ["", ""]


def test_filelist_reads_absolute_paths_and_paths_outside_its_folder(tree: Path) -> None:
    """A read-only image tree needs no copy: outside entries are read where they are, their id the absolute path."""
    (tree / "sub").mkdir()
    (tree / "sub" / "here.png").write_bytes((tree / "cat" / "a.png").read_bytes())
    (tree / "sub" / "list.txt").write_text(f"../dog/b.png\n{tree}/cat/z.png\nhere.png\ncat/../../cat/a.png\n")
    src = filelist_source(str(tree / "sub" / "list.txt"))
    assert list(src.ids()) == [f"{tree}/dog/b.png", f"{tree}/cat/z.png", "here.png", f"{tree}/cat/a.png"]
    assert src.paths()[0] == str(tree / "dog" / "b.png") and all(load_image(p).mode == "RGB" for p in src.paths())
    (tree / "sub" / "missing.txt").write_text("../nope.png\n")
    with pytest.raises(InputError, match="does not exist"):
        load_image(filelist_source(str(tree / "sub" / "missing.txt")).paths()[0])


def test_csv_column_mapping_with_two_label_levels(tree: Path) -> None:
    (tree / "meta.csv").write_text("image,category,subcategory,short_name\n"
                                   f"dog/b.png,animal,dog,rex\n{tree}/cat/a.png,animal,cat,tom\ncat/z.png,animal,cat,kit\n")
    src = filelist_source(str(tree / "meta.csv"), path_column="image", label_columns=["category", "subcategory"],
                          id_column="short_name")
    assert list(src.ids()) == ["rex", "tom", "kit"] and list(src.labels()) == ["animal"] * 3
    coarse, fine = src.taxonomy()
    assert list(coarse) == ["animal"] * 3 and list(fine) == ["dog", "cat", "cat"]
    one = filelist_source(str(tree / "meta.csv"), path_column="image", label_columns=["subcategory"])
    assert list(one.labels()) == ["dog", "cat", "cat"] and one.taxonomy() is None
    assert list(one.ids()) == ["dog/b.png", "cat/a.png", "cat/z.png"]  # an absolute path inside: relative id
    cfg = SourceConfig(kind="filelist", path=str(tree / "meta.csv"), path_column="image",
                       label_columns=["category", "subcategory"], id_column="short_name")
    assert list(source_from_config(cfg).ids()) == ["rex", "tom", "kit"]
    for field, kw, needle in (("path_column", {"path_column": "file"}, "no column 'file'"),
                              ("label_columns", {"label_columns": ["category", "genus"]}, "no column 'genus'"),
                              ("id_column", {"id_column": "uid"}, "no column 'uid'")):
        with pytest.raises(InputError, match=rf"source.{field}: .*meta.csv: the CSV header has {needle}; its columns "
                                             r"are \['image', 'category', 'subcategory', 'short_name'\]"):
            filelist_source(str(tree / "meta.csv"), **{"path_column": "image", **kw})


def test_source_fields_are_refused_where_they_do_not_apply(tree: Path) -> None:
    with pytest.raises(ValueError, match="source.label_level applies to the demo set only"):
        SourceConfig(kind="folder", path=str(tree), label_level="subcategory")
    with pytest.raises(ValueError, match="source.label_columns applies to a CSV file list"):
        SourceConfig(kind="folder", path=str(tree), label_columns=["a"])
    with pytest.raises(ValueError, match="source.path_column applies to a CSV file list"):
        SourceConfig(kind="filelist", path=str(tree / "list.txt"), path_column="image")
    with pytest.raises(ValueError, match="one or two distinct columns"):
        SourceConfig(kind="filelist", path=str(tree / "m.csv"), label_columns=["a", "b", "c"])


def test_filelist_errors(tree: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        filelist_source(str(tree / "nope.csv"))
    (tree / "bad.csv").write_text("file,label\ncat/a.png,cat\n")
    with pytest.raises(InputError, match="source.path_column: .*no column 'path'"):
        filelist_source(str(tree / "bad.csv"))
    (tree / "dup.txt").write_text("cat/a.png\n./cat/a.png\n")
    with pytest.raises(InputError, match="duplicate"):
        filelist_source(str(tree / "dup.txt"))
    (tree / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no images"):
        filelist_source(str(tree / "empty.txt"))


# ----------------------------------------------------------------------------- tar shards
def _png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """Two webdataset-style shards: images with .cls/.txt labels, a key without label, a key without image."""
    d = tmp_path / "shards"
    _write_tar(d / "train-000001.tar", [
        ("b07.png", _png_bytes((0, 0, 255))),
        ("b07.txt", b"blue square\n"),
        ("meta.json", b"{}"),
        ("sub/x.jpg", _png_bytes((9, 9, 9))),  # a PNG named .jpg: decoding goes by content
    ])
    _write_tar(d / "train-000000.tar", [
        ("a01.png", _png_bytes((200, 30, 30))),
        ("a01.cls", b"3"),
        ("a00.png", _png_bytes((30, 200, 30), size=(5, 4))),
        ("a00.cls", b"7\n"),
        ("orphan.cls", b"1"),
        ("c02.jpeg", _png_bytes((1, 2, 3))),
    ])
    return d


def test_tar_source_ids_labels_and_member_decoding(shards: Path) -> None:
    src = tar_source(str(shards / "*.tar"))
    # shards sorted by name, members in tar order, keys without an image ignored
    assert list(src.ids()) == [
        "train-000000/a01", "train-000000/a00", "train-000000/c02", "train-000001/b07", "train-000001/sub/x",
    ]
    assert list(src.labels()) == ["3", "7", "", "blue square", ""]
    assert src.records[2].label is None
    assert src.paths()[0] == f"tar://a01.png::{shards / 'train-000000.tar'}"
    img = load_image(src.paths()[1])
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (30, 200, 30)
    assert load_image(src.paths()[3]).getpixel((2, 2)) == (0, 0, 255)
    # ids do not depend on where the shards live; a list of URLs gives the same source
    moved = shards.parent / "moved"
    shards.rename(moved)
    again = tar_source([str(moved / "train-000001.tar"), f"file://{moved}/train-000000.tar"])
    assert sorted(again.ids()) == sorted(src.ids())
    assert load_image(again.paths()[0]).getpixel((0, 0)) == (0, 0, 255)


def test_tar_source_via_config_and_gzip(shards: Path, tmp_path: Path) -> None:
    cfg = SourceConfig(kind="tar", path=str(shards / "train-*.tar"))
    assert len(source_from_config(cfg)) == 5
    gz = _write_tar(tmp_path / "z" / "s.tar.gz", [("k.png", _png_bytes((5, 6, 7))), ("k.cls", b"2")], mode="w:gz")
    src = tar_source(str(gz))
    assert list(src.ids()) == ["s/k"] and list(src.labels()) == ["2"]
    assert load_image(src.paths()[0]).getpixel((0, 0)) == (5, 6, 7)


def test_tar_source_errors_and_broken_members(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no tar shard matches"):
        tar_source(str(tmp_path / "none-*.tar"))
    (tmp_path / "bad.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(InputError, match="not a readable tar"):
        tar_source(str(tmp_path / "bad.tar"))
    _write_tar(tmp_path / "labels-only.tar", [("a.cls", b"1")])
    with pytest.raises(InputError, match="no images"):
        tar_source(str(tmp_path / "labels-only.tar"))
    shard = _write_tar(tmp_path / "broken.tar", [("zero.png", b""), ("text.png", b"hello"), ("ok.png", _png_bytes((1, 1, 1)))])
    src = tar_source(str(shard))
    with pytest.raises(InputError, match="empty") as err:
        load_image(src.paths()[0])
    assert "zero.png" in str(err.value) and "broken.tar" in str(err.value)
    with pytest.raises(InputError, match="not a readable image"):
        load_image(src.paths()[1])
    with pytest.raises(InputError, match="does not exist"):
        load_image(f"tar://missing.png::{shard}")


def test_source_from_config_dispatches_each_kind(tree: Path) -> None:
    (tree / "list.txt").write_text("dog/b.png\n")
    assert len(source_from_config(SourceConfig())) == 1906
    assert set(source_from_config(SourceConfig(label_level="subcategory")).labels()) >= {"face-smiling"}
    assert len(source_from_config(SourceConfig(kind="folder", path=str(tree)))) == 4
    assert list(source_from_config(SourceConfig(kind="filelist", path=str(tree / "list.txt"))).ids()) == ["dog/b.png"]


def test_image_source_rejects_empty_and_duplicate_ids() -> None:
    with pytest.raises(InputError, match="no images"):
        ImageSource((), description="my list")
    with pytest.raises(InputError, match="duplicate.*'x'"):
        ImageSource((ImageRecord("x", "a.png"), ImageRecord("x", "b.png")), description="my list")


# ----------------------------------------------------------------------------- decoding
def test_grayscale_and_palette(tmp_path: Path) -> None:
    PIL.Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    img = load_image(str(tmp_path / "gray.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)

    pal = PIL.Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "pal.png", transparency=0)  # index 0 transparent
    img = load_image(str(tmp_path / "pal.png"))
    assert img.mode == "RGB"
    assert img.getpixel((1, 1)) == (10, 200, 30)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent → white, not black

    pal.save(tmp_path / "pal.gif")
    assert load_image(str(tmp_path / "pal.gif")).getpixel((1, 1)) == (10, 200, 30)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (0, 0, 255, 0)  # fully transparent blue
    a[1, 0] = (0, 0, 0, 128)  # half-transparent black
    PIL.Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    img = load_image(str(tmp_path / "rgba.png"))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((1, 0)) == (255, 255, 255)
    assert all(126 <= c <= 128 for c in img.getpixel((0, 1)))

    PIL.Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_image(str(tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # red
    assert PIL.Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    img = load_image(str(tmp_path / "cmyk.jpg"))
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 230 and g < 30 and b < 30


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.array([[0, 257 * 100], [65535, 1000]], dtype=np.uint16)
    PIL.Image.fromarray(a).save(tmp_path / "deep.png")
    assert PIL.Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = load_image(str(tmp_path / "deep.png"))
    assert img.mode == "RGB"
    assert np.asarray(img)[:, :, 0].tolist() == [[0, 100], [255, 4]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; left half white
    a[:, :20] = 255
    im = PIL.Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(str(tmp_path / "rot.jpg"))
    assert img.size == (20, 40)
    assert np.asarray(img)[5, 10].min() > 200 and np.asarray(img)[35, 10].max() < 50  # white on top


def _truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b"") or p, "empty"),
        (_truncated_png, "truncated or corrupt"),
        (lambda p: p.write_text("hello, I am text") or p, "not a readable image"),
    ],
    ids=["zero-byte", "truncated", "text-named-png"],
)
def test_broken_files_raise_input_error_naming_the_file(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "broken.png"
    make(path)
    with pytest.raises(InputError, match=reason) as err:
        load_image(str(path))
    assert str(path) in str(err.value)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_image(str(tmp_path / "gone.png"))


def test_a_local_file_name_with_double_colons_is_read(tmp_path: Path) -> None:
    """`a::b.png` is a file name, not fsspec's URL chaining (which made it a missing file `a`)."""
    (tmp_path / "c0").mkdir()
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "c0" / "a::b.png")
    src = folder_source(str(tmp_path))
    assert src.ids().tolist() == ["c0/a::b.png"]
    assert np.asarray(load_image(src.paths()[0]))[0, 0].tolist() == [255, 0, 0]
