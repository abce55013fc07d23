"""The object ↔ image mapping of human triplets, on generated THINGS-layout trees: never positional
unless declared, objects = concepts (several images averaged), missing objects reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from alignet_core.config import parse_config
from alignet_core.errors import ConfigError, InputError
from alignet_core.evaluate.sets import build_sets
from alignet_core.human import triplets as human
from alignet_core.human.data import load_human_data
from alignet_core.human.mapping import object_mapping
from alignet_core.io import sources
from flows.cli import main

# THINGS order is not alphabetical: a path-sorted folder lists 'apple' first, the file's object 0 is 'zebra'
CONCEPTS = ["zebra", "apple", "mango", "kiwi", "banjo", "cello", "drum", "fig", "lime", "yak"]
IMAGES = {"zebra": 3, "apple": 2, "mango": 4, "kiwi": 2, "banjo": 3, "cello": 2, "drum": 2, "fig": 2, "lime": 3,
          "yak": 0}  # yak has no images


def things_tree(root: Path, images: dict[str, int] = IMAGES) -> Path:
    """`root/object_images/<concept>/<concept>_NNb.jpg`, each image a flat colour; returns object_images/."""
    rng = np.random.default_rng(0)
    tree = root / "object_images"
    for concept, n in images.items():
        (tree / concept).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            PIL.Image.new("RGB", (8, 8), colour).save(tree / concept / f"{concept}_{k + 1:02d}b.jpg")
    return tree


def triplets_file(path: Path, rows: list[tuple[int, int, int]]) -> str:
    path.write_text("".join(f"{a} {b} {c}\n" for a, b, c in rows))
    return str(path)


# triplets over THINGS object indices; every object in every role so each fold has some
ROWS = [(a, b, c) for a in range(10) for b in range(10) for c in range(10) if len({a, b, c}) == 3]


def _cfg(tmp_path: Path, tree: Path, **human_: object) -> object:
    return parse_config({"root": str(tmp_path / "root"), "source": {"kind": "folder", "path": str(tree)},
                         "cluster": {"k": 2}, "human": {"folds": 3, **human_}})


def test_path_sorted_folder_is_refused_without_a_declared_mapping(tmp_path: Path) -> None:
    tree = things_tree(tmp_path)
    trip = triplets_file(tmp_path / "t.txt", ROWS)
    src = sources.source_from_config(_cfg(tmp_path, tree, triplets=trip, positional=True).source)
    # the trap: by position, object 0 ('zebra' in THINGS order) would be an 'apple' image
    assert src.ids()[0].startswith("apple/")
    with pytest.raises(ConfigError, match="sorted by path") as err:
        load_human_data(_cfg(tmp_path, tree, triplets=trip), src)
    for fix in ("human.concepts", "human.objects", "human.positional: true"):
        assert fix in str(err.value)


def test_two_declared_mappings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="human.concepts and human.positional each declare"):
        _cfg(tmp_path, tmp_path, triplets="t.txt", concepts="c.txt", positional=True)


@pytest.mark.parametrize("order_file", ["unique_id.txt", "things_concepts.tsv"])
def test_things_tree_maps_by_concept_and_reports_the_missing_one(tmp_path: Path, order_file: str) -> None:
    tree = things_tree(tmp_path)
    if order_file.endswith(".tsv"):
        (tmp_path / order_file).write_text("Word\tuniqueID\n" + "".join(f"{c} x\t{c}\n" for c in CONCEPTS))
    else:
        (tmp_path / order_file).write_text("\n".join(CONCEPTS) + "\n")
    cfg = _cfg(tmp_path, tree, triplets=triplets_file(tmp_path / "t.txt", ROWS), concepts=str(tmp_path / order_file),
               stimulus="average")
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    m = data.mapping
    assert m is not None and m.n_declared == 10 and m.n_objects == 9 and m.missing == ["yak"] and m.n_missing == 1
    assert m.images_mapped == 23 and m.images_unmapped == 0 and m.images_per_object == (2, 2.0, 4)
    with_yak = sum(9 in r for r in ROWS)
    assert m.triplets_in_file == len(ROWS) and m.triplets_kept == len(ROWS) - with_yak == len(data.triplets)
    # compact ids follow THINGS order without yak (the last): zebra 0, apple 1, mango 2, ...
    concept_of = {i: c for i, c in enumerate(CONCEPTS[:9])}
    for img_id, obj in zip(src.ids().tolist(), data.object_of_image.tolist()):
        assert concept_of[obj] == img_id.split("/")[0]
    kept_rows = [r for r in ROWS if 9 not in r]
    assert data.triplets.tolist() == [list(r) for r in kept_rows]  # kept rows keep their order and ids
    # the transform's object embeddings are the per-concept means of the images' embeddings
    emb = np.random.default_rng(1).normal(size=(len(src), 4)).astype(np.float32)
    objs = human.object_embeddings(emb, data.object_of_image, data.n_objects)
    for obj, concept in concept_of.items():
        rows = [i for i, x in enumerate(src.ids().tolist()) if x.startswith(concept + "/")]
        np.testing.assert_allclose(objs[obj], emb[rows].mean(0), rtol=1e-6)
    lines = "\n".join(m.lines())
    assert "objects with images: 9 of 10" in lines and "['yak']" in lines and f"triplets kept: {m.triplets_kept}" in lines


def test_concepts_that_match_no_folder_name_the_mismatch(tmp_path: Path) -> None:
    tree = things_tree(tmp_path, {"apple": 2, "kiwi": 2})
    (tmp_path / "c.txt").write_text("Apple\nKiwi\nPear\n")
    cfg = _cfg(tmp_path, tree, triplets=triplets_file(tmp_path / "t.txt", [(0, 1, 2)]), concepts=str(tmp_path / "c.txt"))
    with pytest.raises(InputError, match=r"human.concepts: no image .* folder named after a concept.*'Apple'.*'apple'"):
        load_human_data(cfg, sources.source_from_config(cfg.source))


def test_table_names_unknown_ids_and_drops_triplets_of_imageless_objects(tmp_path: Path) -> None:
    tree = things_tree(tmp_path, {"apple": 2, "kiwi": 2, "mango": 1})
    (tmp_path / "objects.csv").write_text("object,image_id\n0,apple/apple_01b.jpg\n0,apple/apple_02b.jpg\n"
                                          "1,kiwi/kiwi_01b.jpg\n2,mango/mango_01b.jpg\n3,pear/pear_01b.jpg\n")
    rows = np.array([(0, 1, 2), (2, 1, 0), (0, 1, 3), (1, 2, 0)])
    cfg = _cfg(tmp_path, tree, triplets="unused", objects=str(tmp_path / "objects.csv"))
    mapping = object_mapping(cfg.human, cfg.source, sources.source_from_config(cfg.source))
    m = mapping.summary
    assert m.n_declared == 4 and m.n_objects == 3 and m.missing == ["3"] and m.unknown == ["pear/pear_01b.jpg"]
    assert m.images_unmapped == 1 and mapping.object_of_image.tolist() == [0, 0, 1, -1, 2]  # kiwi_02b in no object
    kept, compact = mapping.map_triplets(rows)
    assert kept.tolist() == [0, 1, 3] and compact.tolist() == [[0, 1, 2], [2, 1, 0], [1, 2, 0]]


def test_positional_when_declared_is_object_i_image_i(tmp_path: Path) -> None:
    tree = things_tree(tmp_path, {"apple": 5, "kiwi": 5})
    cfg = _cfg(tmp_path, tree, triplets=triplets_file(tmp_path / "t.txt", ROWS), positional=True)
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    assert data.object_of_image.tolist() == list(range(10)) and data.mapping.kind.startswith("positional")


def test_validate_prints_the_mapping_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = things_tree(tmp_path)
    (tmp_path / "unique_id.txt").write_text("\n".join(CONCEPTS) + "\n")
    trip = triplets_file(tmp_path / "t.txt", ROWS)
    args = ["validate", "--root", str(tmp_path / "root"), "--set", "source.kind=folder", "--set", f"source.path={tree}",
            "--set", "cluster.k=2", "--set", "human.folds=3", "--set", f"human.triplets={trip}"]
    assert main(args) == 2
    assert "sorted by path" in capsys.readouterr().err
    assert main([*args, "--set", f"human.concepts={tmp_path / 'unique_id.txt'}", "--set", "human.stimulus=average"]) == 0
    out = capsys.readouterr().out
    assert "object ↔ image mapping: THINGS concepts" in out and "objects with images: 9 of 10" in out
    assert "objects without images: 1, e.g. ['yak']" in out and "config ok" in out
    assert not (tmp_path / "root").exists()


# ----------------------------------------------------------------------------- the proxy of any labelled source
def _labelled_images(root: Path, n_per: int = 6) -> Path:
    """A CSV list over a THINGS-like tree: two categories of three classes, `n_per` images per class."""
    classes = {"animal": ["yak", "zebra", "kiwi"], "food": ["apple", "mango", "fig"]}
    tree = things_tree(root, {c: n_per for cs in classes.values() for c in cs})
    rows = [f"{tree}/{c}/{c}_{k + 1:02d}b.jpg,{cat},{c}" for cat, cs in classes.items() for c in cs for k in range(n_per)]
    (root / "meta.csv").write_text("image,category,subcategory\n" + "\n".join(rows) + "\n")
    return root / "meta.csv"


def test_a_labelled_csv_source_gets_the_taxonomy_proxy_at_every_level(tmp_path: Path) -> None:
    meta = _labelled_images(tmp_path)
    cfg = parse_config({"root": str(tmp_path / "root"), "cluster": {"k": 2},
                        "source": {"kind": "filelist", "path": str(meta), "path_column": "image",
                                   "label_columns": ["category", "subcategory"]},
                        "human": {"folds": 3, "proxy_n_triplets": 600,
                                  "proxy_mix": {"category_boundary": 1, "sibling_boundary": 1, "class_boundary": 1}}})
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    assert data.is_proxy and data.name(cfg) == "taxonomy proxy (not human)" and len(data.triplets) == 600
    assert set(data.level_of.tolist()) == {"category_boundary", "sibling_boundary", "class_boundary"}
    # the same two label columns build the evaluation levels, over the test fold's images
    sets = {s.name: s for s in build_sets(cfg, src, data)}
    assert {"category_boundary", "sibling_boundary", "class_boundary", "proxy"} <= set(sets) and "human" not in sets
    coarse = np.asarray(src.labels())
    g = sets["category_boundary"].triplets
    assert (coarse[g[:, 0]] == coarse[g[:, 1]]).all() and (coarse[g[:, 2]] != coarse[g[:, 0]]).all()


def test_class_folders_get_a_class_level_proxy_and_a_flat_folder_none(tmp_path: Path, capsys) -> None:
    tree = things_tree(tmp_path, {c: 5 for c in ("apple", "kiwi", "mango", "fig", "yak", "zebra")})
    cfg = _cfg(tmp_path, tree, proxy_n_triplets=300)
    data = load_human_data(cfg, sources.source_from_config(cfg.source))
    assert data.is_proxy and set(data.level_of.tolist()) <= {"sibling_boundary", "class_boundary"} and len(data.triplets) == 300
    args = ["validate", "--root", str(tmp_path / "root"), "--set", "source.kind=folder", "--set", f"source.path={tree}",
            "--set", "cluster.k=2", "--set", "human.folds=3"]
    assert main(args) == 0
    assert "human data: the taxonomy proxy (not human), drawn from the source's labels: 1 coarse categories, 6 classes" \
        in capsys.readouterr().out
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(tree.glob("*/*.jpg"))[:6]:
        (flat / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ConfigError, match=r"human.triplets: .*6 of the 6 images .* have no label .*no taxonomy proxy"):
        load_human_data(_cfg(tmp_path, flat), sources.source_from_config(_cfg(tmp_path, flat).source))


def _with_triplet_images(tree: Path, concepts: list[str]) -> None:
    """Add THINGS' triplet-task image `<concept>/<concept>.jpg` to each of `concepts`' folders."""
    for k, concept in enumerate(concepts):
        PIL.Image.new("RGB", (8, 8), (k, 255 - k, 7)).save(tree / concept / f"{concept}.jpg")


def test_stimulus_is_the_triplet_image_named_after_the_concept(tmp_path: Path) -> None:
    """The default: one image per concept, the one participants saw; the other images of the folder are
    tied to no object (not averaged in)."""
    tree = things_tree(tmp_path)
    _with_triplet_images(tree, [c for c in CONCEPTS if IMAGES[c]])
    (tmp_path / "c.txt").write_text("\n".join(CONCEPTS) + "\n")
    cfg = _cfg(tmp_path, tree, triplets=triplets_file(tmp_path / "t.txt", ROWS), concepts=str(tmp_path / "c.txt"))
    src = sources.source_from_config(cfg.source)
    data = load_human_data(cfg, src)
    m = data.mapping
    assert m.n_objects == 9 and m.missing == ["yak"] and m.images_per_object == (1, 1.0, 1)
    assert m.images_mapped == 9 and m.images_unmapped == 23 and "one triplet-task image per concept" in m.kind
    ids = src.ids().tolist()
    tied = {ids[r]: int(o) for r, o in enumerate(data.object_of_image.tolist()) if o >= 0}
    assert tied == {f"{c}/{c}.jpg": i for i, c in enumerate(CONCEPTS[:9])}
    emb = np.random.default_rng(1).normal(size=(len(src), 4)).astype(np.float32)
    objs = human.object_embeddings(emb, data.object_of_image, data.n_objects)
    np.testing.assert_allclose(objs[0], emb[ids.index("zebra/zebra.jpg")], rtol=1e-6)


def test_a_concept_without_its_triplet_image_is_refused_in_one_line(tmp_path: Path) -> None:
    tree = things_tree(tmp_path, {"apple": 2, "kiwi": 2})
    _with_triplet_images(tree, ["apple"])
    (tmp_path / "c.txt").write_text("apple\nkiwi\n")
    cfg = _cfg(tmp_path, tree, triplets="unused", concepts=str(tmp_path / "c.txt"))
    with pytest.raises(InputError) as err:
        object_mapping(cfg.human, cfg.source, sources.source_from_config(cfg.source))
    msg = str(err.value)
    assert "\n" not in msg and "concept 'kiwi' has 0 image(s) matching 'kiwi/kiwi.jpg'" in msg
    assert "human.stimuli" in msg and "human.stimulus: average" in msg


def test_stimuli_file_names_one_image_per_concept(tmp_path: Path) -> None:
    tree = things_tree(tmp_path, {"apple": 2, "kiwi": 3})
    (tmp_path / "c.txt").write_text("kiwi\napple\n")
    (tmp_path / "s.csv").write_text("concept,image\napple,apple_02b.jpg\nkiwi,kiwi/kiwi_03b.jpg\n")
    cfg = _cfg(tmp_path, tree, triplets="unused", concepts=str(tmp_path / "c.txt"), stimuli=str(tmp_path / "s.csv"))
    src = sources.source_from_config(cfg.source)
    mapping = object_mapping(cfg.human, cfg.source, src)
    ids = src.ids().tolist()
    assert ids == ["apple/apple_01b.jpg", "apple/apple_02b.jpg", "kiwi/kiwi_01b.jpg", "kiwi/kiwi_02b.jpg",
                   "kiwi/kiwi_03b.jpg"]
    assert mapping.object_of_image.tolist() == [-1, 1, -1, -1, 0]  # kiwi is object 0 in the concept order
    (tmp_path / "s.csv").write_text("concept,image\napple,apple_02b.jpg\nkiwi,kiwi_09b.jpg\n")
    with pytest.raises(InputError, match=r"concept 'kiwi' has 0 image\(s\) matching 'kiwi_09b.jpg'"):
        object_mapping(cfg.human, cfg.source, src)
    (tmp_path / "s.csv").write_text("concept,image\napple,apple_02b.jpg\n")
    with pytest.raises(InputError, match=r"names no image for concept 'kiwi'"):
        object_mapping(cfg.human, cfg.source, src)
    (tmp_path / "s.csv").write_text("concept,image\npear,pear.jpg\n")
    with pytest.raises(InputError, match=r"line 2: concept 'pear' is not in human.concepts"):
        object_mapping(cfg.human, cfg.source, src)
    with pytest.raises(ConfigError, match="human.stimuli: .* needs human.concepts and human.stimulus: triplet_image"):
        _cfg(tmp_path, tree, triplets="unused", concepts=str(tmp_path / "c.txt"), stimuli="s.csv", stimulus="average")
