"""The real human data the project ships: THINGS odd-one-out trials (Hebart et al. 2020, CC-BY-4.0),
the THINGS concept order, and a checked map from 225 THINGS concepts to demo emoji
(`alignet_core/data/things/README.md`: provenance, licence, citation, and the 140 concepts reserved for
an outside check, which are not in the trials and must not be added to the map)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from alignet_core.errors import InputError
from alignet_core.io.formats import read_things_triplets
from alignet_core.io.sources import demo_data_dir

#: THINGS has 1,854 concepts (objects 0..1853 of the triplet file)
N_CONCEPTS = 1854


def things_dir() -> Path:
    """The folder of the shipped THINGS files."""
    return demo_data_dir() / "things"


class EmojiMap(BaseModel):
    """The shipped map: THINGS object id, its concept, and the demo emoji (an image id of the demo source)
    that shows it, one row per (concept, emoji) pair: a concept may have two emoji (an animal and its face), and
    an emoji may show two concepts (⛵ is both `boat` and `sailboat`)."""

    model_config = ConfigDict(frozen=True)

    objects: tuple[int, ...]
    concepts: tuple[str, ...]
    emoji_ids: tuple[str, ...]

    @property
    def mapped_objects(self) -> np.ndarray:
        """The distinct THINGS object ids the map covers, sorted."""
        return np.unique(np.asarray(self.objects, dtype=np.int64))


def read_concepts(path: Path | None = None) -> list[str]:
    """THINGS concept uniqueIDs in object-id order (line i names object i)."""
    path = path or things_dir() / "concepts.txt"
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: concept names repeat; line i must name object i once")
    return names


def read_trials(path: Path | None = None) -> np.ndarray:
    """The shipped trials as int64 (n, 3), `i j k` with k the participant's odd one out."""
    return read_things_triplets(str(path or things_dir() / "triplets.txt"), N_CONCEPTS)


def read_emoji_map(path: Path | None = None, concepts: list[str] | None = None) -> EmojiMap:
    """The map, checked against the concept order: each row's concept must be the concept of its object id
    (a map read in another id order fails here, not as silently wrong similarities)."""
    path = path or things_dir() / "emoji_map.csv"
    concepts = concepts if concepts is not None else read_concepts()
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    objects, names, emoji = [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            o, concept, eid = int(row["object"]), row["concept"].strip(), row["emoji_id"].strip()
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(f"{path}: line {line}: expected columns object (int), concept, emoji_id") from None
        if not 0 <= o < len(concepts) or concepts[o] != concept:
            have = concepts[o] if 0 <= o < len(concepts) else "no concept"
            raise InputError(f"{path}: line {line}: object {o} is {have!r} in the concept order, not {concept!r}")
        objects.append(o)
        names.append(concept)
        emoji.append(eid)
    return EmojiMap(objects=tuple(objects), concepts=tuple(names), emoji_ids=tuple(emoji))


def _name_key(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def one_concept_per_emoji(emoji_map: EmojiMap, emoji_names: dict[str, str]) -> dict[str, int]:
    """emoji id → the THINGS object it stands for, one per emoji.

    An image is one object's stimulus, so where the map ties an emoji to two concepts (4 emoji: ⛵ boat and
    sailboat, 🐬 dolphin and flipper, 🐎 horse and racehorse, 👕 shirt and t-shirt) the concept that is the emoji's
    own name keeps it (`emoji_names`: id → the emoji's name, e.g. 'SAILBOAT'); the other loses it (boat,
    flipper: THINGS' swim fin, which the dolphin does not show; racehorse; shirt). `InputError` naming the
    emoji when its name matches none or several of its concepts."""
    ties: dict[str, list[tuple[int, str]]] = {}
    for o, concept, eid in zip(emoji_map.objects, emoji_map.concepts, emoji_map.emoji_ids, strict=True):
        ties.setdefault(eid, []).append((o, concept))
    out: dict[str, int] = {}
    for eid, pairs in ties.items():
        if len(pairs) == 1:
            out[eid] = pairs[0][0]
            continue
        own = [o for o, concept in pairs if _name_key(concept) == _name_key(emoji_names.get(eid, ""))]
        if len(own) != 1:
            raise InputError(f"emoji map: emoji {eid} ({emoji_names.get(eid, 'no name')!r}) shows concepts "
                             f"{[c for _, c in pairs]}, and its name picks {len(own)} of them; an image stands for one "
                             "object")
        out[eid] = own[0]
    return out
