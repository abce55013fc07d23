"""The shipped THINGS data load as their README says: the files are the ones received (sha256), the id
order is the concept order (the map's concepts agree with it, and the README's counts of trials over
mapped objects come out), every emoji of the map is a demo image, and the licence travels with them."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.human import things
from alignet_core.io.sources import demo_metadata


def test_the_files_are_the_ones_the_readme_names():
    readme = (things.things_dir() / "README.md").read_text()
    for name, digest in re.findall(r"\| `([\w.]+)` \| `([0-9a-f]{64})` \|", readme):
        assert hashlib.sha256((things.things_dir() / name).read_bytes()).hexdigest() == digest, name
    assert "CC-BY-4.0" in readme and "Hebart" in readme and "reserved" in readme
    assert "CC BY 4.0" in (things.things_dir() / "LICENSE-things-CC-BY-4.0.txt").read_text()


def test_trials_concepts_and_map_load_with_the_readmes_counts():
    concepts = things.read_concepts()
    trials = things.read_trials()
    emoji = things.read_emoji_map(concepts=concepts)
    assert len(concepts) == things.N_CONCEPTS and trials.shape == (115_313, 3)
    assert trials.min() >= 0 and trials.max() < things.N_CONCEPTS
    assert (trials[:, 0] != trials[:, 1]).all() and (trials[:, 1] != trials[:, 2]).all()
    assert (trials[:, 0] != trials[:, 2]).all()
    mapped = emoji.mapped_objects
    assert len(mapped) == 225 and len(emoji.emoji_ids) == 230 and len(set(emoji.emoji_ids)) == 226
    in_map = np.isin(trials, mapped).sum(1)
    assert (in_map == 3).sum() == 238 and (in_map >= 2).sum() == 5_526  # the README's counts
    demo_ids = {row["id"] for row in demo_metadata()}
    assert set(emoji.emoji_ids) <= demo_ids


def test_a_map_read_in_another_id_order_is_refused(tmp_path):
    concepts = things.read_concepts()
    shifted = concepts[1:] + concepts[:1]
    with pytest.raises(InputError, match=r"line 2: object \d+ is '.*' in the concept order, not"):
        things.read_emoji_map(concepts=shifted)
    bad = tmp_path / "map.csv"
    bad.write_text("object,concept\n1,abacus\n")
    with pytest.raises(InputError, match="expected columns object"):
        things.read_emoji_map(bad, concepts)
