"""`human.shipped: things` and `human.densify`'s inputs: the shipped trials attach to the demo emoji one concept
per emoji, `alignet validate` reports their counts, and bad input is refused in one line before any work
(no triplet file, ids outside the concept list, a map naming unknown images, settings that contradict)."""

from __future__ import annotations

import numpy as np
import pytest

from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.errors import InputError
from alignet_core.human import things
from alignet_core.io.sources import demo_metadata
from flows.cli import main

SHIPPED = ["--set", "human.shipped=things", "--set", "human.densify={n_triplets: 100, n_test: 50}",
           "--set", "human.folds=3"]


def test_each_emoji_stands_for_the_concept_it_is_named_after():
    """Four emoji of the map show two concepts; the one the emoji is named after keeps it, the other loses it
    (flipper is THINGS' swim fin, not the dolphin)."""
    concepts = things.read_concepts()
    per_emoji = things.one_concept_per_emoji(things.read_emoji_map(concepts=concepts),
                                             {m["id"]: m["name"] for m in demo_metadata()})
    assert len(per_emoji) == 226 and len(set(per_emoji.values())) == 221
    kept = {concepts[per_emoji[e]] for e in ("26f5", "1f42c", "1f40e", "1f455")}
    assert kept == {"sailboat", "dolphin", "horse", "t-shirt"}
    lost = {"boat", "flipper", "racehorse", "shirt"}
    assert not lost & {concepts[o] for o in per_emoji.values()}
    # horse keeps its second emoji (the face): a concept with two emoji averages them
    assert sum(concepts[o] == "horse" for o in per_emoji.values()) == 2


def test_an_emoji_whose_name_picks_none_of_its_concepts_is_refused():
    m = things.EmojiMap(objects=(0, 1), concepts=("a", "b"), emoji_ids=("x", "x"))
    with pytest.raises(InputError, match=r"emoji x \('C'\) shows concepts \['a', 'b'\].*picks 0 of them"):
        things.one_concept_per_emoji(m, {"x": "C"})


def test_the_shipped_data_attach_to_the_demo_emoji_and_split_into_folds():
    cfg = PipelineConfig.model_validate({"source": {"kind": "demo"}, "human": {
        "shipped": "things", "densify": {"n_triplets": 100, "n_test": 50}, "folds": 3}})
    data = RunContext.of(cfg).human
    assert data is not None and data.dense and not data.is_proxy
    assert data.n_declared == things.N_CONCEPTS and data.n_objects == 221
    assert data.trials.shape == (115_313, 3) and len(data.declared_of) == 221
    assert (data.object_of_image >= 0).sum() == 226
    assert np.bincount(data.fold_of).tolist() in ([74, 74, 73], [74, 73, 74], [73, 74, 74])
    # the real trials over mapped objects: 238 name three mapped concepts; 11 of them name a concept that lost its emoji
    assert len(data.triplets) == 227 and (data.triplets < 221).all()
    assert "densified by VICE" in data.name(cfg) and "Hebart" in data.name(cfg)


def test_validate_reports_the_counts(capsys):
    assert main(["validate", *SHIPPED]) == 0
    out = capsys.readouterr().out
    assert "objects with images: 221 of 1854" in out
    assert "human.densify: VICE on all 115313 trials over 1854 objects" in out
    assert "227 trials name three objects with images" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "human.shipped=things"], "human.shipped: the shipped THINGS trials need human.densify"),
        ([*SHIPPED, "--set", "human.triplets=/x.txt"], "remove human.triplets"),
        ([*SHIPPED, "--set", "source.kind=folder", "--set", "source.path=/tmp"], "needs source.kind demo"),
        (["--set", "human.densify={}"], "human.densify: needs the trials to fit VICE on"),
        (["--set", "human.densify={}", "--set", "human.triplets=/nope/t.txt"], "/nope/t.txt"),
        ([*SHIPPED, "--set", "transform.soft_targets=vice"], "transform.soft_targets: 'vice'"),
        ([*SHIPPED, "--set", "human.folds=80"], "221 objects have images; 80 folds need at least 3 each"),
    ],
)
def test_bad_settings_are_refused_in_one_line(args, needle, capsys):
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def _table_config(tmp_path, rows: list[str], trials: str) -> list[str]:
    (tmp_path / "t.txt").write_text(trials)
    (tmp_path / "map.csv").write_text("object,image_id\n" + "\n".join(rows) + "\n")
    return ["--set", f"human.triplets={tmp_path / 't.txt'}", "--set", f"human.objects={tmp_path / 'map.csv'}",
            "--set", "human.densify={n_triplets: 10, n_test: 10}", "--set", "human.folds=2"]


def test_a_map_naming_unknown_images_is_refused(tmp_path, capsys):
    ids = [m["id"] for m in demo_metadata()[:8]]
    rows = [f"{i},{e}" for i, e in enumerate(ids)]
    good = "0 1 2\n3 4 5\n"
    assert main(["validate", *_table_config(tmp_path, rows, good)]) == 0
    capsys.readouterr()
    assert main(["validate", *_table_config(tmp_path, [*rows, "8,not-an-emoji"], good)]) == 2
    err = capsys.readouterr().err
    assert "human.objects" in err and "1 image id(s) the map names are not in the image source" in err
    assert "not-an-emoji" in err and len(err.strip().splitlines()) == 1
    # a table declares no object count: an id beyond it is an object without images (kept for VICE)
    assert main(["validate", *_table_config(tmp_path, rows, good + "0 1 9\n")]) == 0
    capsys.readouterr()


def test_trial_ids_outside_the_concept_list_are_refused(tmp_path, capsys):
    from PIL import Image

    names = ["apple", "bear", "cat", "dog", "egg"]
    for n in names:
        (tmp_path / "images" / n).mkdir(parents=True)
        Image.new("RGB", (8, 8), (len(n) * 40, 0, 0)).save(tmp_path / "images" / n / f"{n}.png")
    (tmp_path / "concepts.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "t.txt").write_text("0 1 2\n0 1 7\n")
    args = ["--set", "source.kind=folder", "--set", f"source.path={tmp_path / 'images'}",
            "--set", f"human.triplets={tmp_path / 't.txt'}", "--set", f"human.concepts={tmp_path / 'concepts.txt'}",
            "--set", "cluster.k=2", "--set", "human.densify={n_triplets: 10, n_test: 10}", "--set", "human.folds=1"]
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert "human.folds" in err and len(err.strip().splitlines()) == 1  # folds ≥ 2, named first
    assert main(["validate", *args[:-1], "human.folds=2"]) == 2
    err = capsys.readouterr().err
    assert "human.triplets" in err and "line 2" in err and "[0, 5)" in err and len(err.strip().splitlines()) == 1, err
