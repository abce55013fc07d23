"""The explicit, checked mapping of a triplet file's objects to the images of the source.

A THINGS-format triplet file names objects by index (0..m-1), not images. Which images show object
i must be declared, never guessed from the source's order (a folder source is sorted by path, so
"object i = image i" silently attaches THINGS choices to the wrong images):

- `human.concepts`: the THINGS convention. The file lists the concepts in THINGS order (one per
  line, like THINGS' `unique_id.txt`, or a CSV/TSV with a `uniqueID` column, like
  `things_concepts.tsv`); object i is concept i, and its images are those whose parent folder is
  named after it (`object_images/<concept>/...`). Participants saw one image per concept, and
  gLocal embeds exactly that one, so by default (`human.stimulus: triplet_image`) the object is
  that image: the one `human.stimuli` names, else the one named after the concept
  (`<concept>/<concept>.jpg`); a concept folder without it is refused, naming the concept.
  `human.stimulus: average` ties every image of the folder to the object instead, and the
  transform averages them (`human.object_embeddings`).
- `human.objects`: a CSV `object,image_id` (one row per image of an object).
- `human.positional: true`: object i is image i of the source, by declaration only.

Objects with no image and the triplets that name them are dropped, counted and named; the kept
objects are renumbered 0..k-1 in file order (the identity when every object has an image), so every
later step sees only objects it can embed. `MappingSummary` is what `alignet validate` prints.
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict

from alignet_core.config.human import HumanConfig
from alignet_core.errors import ConfigError, InputError
from alignet_core.human import things
from alignet_core.io import sources
from alignet_core.io.source_config import SourceConfig
from alignet_core.records import Record

log = logging.getLogger(__name__)

CONCEPT_COLUMN = "uniqueID"  # things_concepts.tsv's column of concept names (= image folder names)
NAMED = 5  # examples named in a summary or a message


class MappingSummary(Record):
    """How a triplet file's objects attach to the images: what `alignet validate` prints before any work."""

    kind: str  # 'THINGS concepts (<file>)', 'table (<file>)', 'positional (declared)'
    n_declared: int  # objects the mapping declares (concepts, table objects, or source images)
    n_objects: int  # of those, objects with at least one image: the objects every later step uses
    missing: list[str]  # first NAMED objects with no image (concept names or indices)
    n_missing: int
    images_mapped: int  # source images tied to an object
    images_unmapped: int  # source images tied to none (not in the table, folder not a concept)
    unknown: list[str]  # first NAMED ids the mapping names that the source lacks (table image ids,
    n_unknown: int      # or image folders that are no concept)
    images_per_object: tuple[int, float, int]  # (min, median, max) over the kept objects
    triplets_in_file: int = 0
    triplets_kept: int = 0  # triplets whose three objects all have images

    def lines(self) -> list[str]:
        """The summary as lines for a terminal or a report."""
        lo, med, hi = self.images_per_object
        out = [f"object ↔ image mapping: {self.kind}",
               f"  objects with images: {self.n_objects} of {self.n_declared} "
               f"(images per object: min {lo}, median {med:g}, max {hi})",
               f"  images tied to an object: {self.images_mapped}; tied to none: {self.images_unmapped}"]
        if self.n_missing:
            out.append(f"  objects without images: {self.n_missing}, e.g. {self.missing}")
        if self.n_unknown:
            out.append(f"  unknown ids (named by the mapping, not in the source): {self.n_unknown}, e.g. {self.unknown}")
        out.append(f"  triplets kept: {self.triplets_kept} of {self.triplets_in_file} "
                   f"({self.triplets_in_file - self.triplets_kept} name an object without images)")
        return out


class ObjectMapping(BaseModel):
    """The object of each image (compact ids 0..k-1 over the objects that have images) and how the
    triplet file's object indices map onto them."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    object_of_image: np.ndarray  # (n,) int64 compact object id per source image, -1 for none
    compact_of: np.ndarray  # (n_declared,) int64 compact id of each declared object, -1 without images
    summary: MappingSummary

    @property
    def n_objects(self) -> int:
        return self.summary.n_objects

    def map_triplets(self, triplets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kept rows (k,) of `triplets`, those rows in compact object ids (k, 3)); `triplets` (t, 3)
        are the file's object indices, already checked to lie in [0, n_declared)."""
        c = self.compact_of[triplets]
        keep = np.flatnonzero((c >= 0).all(axis=1))
        return keep, c[keep]


def undeclared_message(source: SourceConfig) -> str:
    """Why a triplet file without a declared mapping is refused, and the fix."""
    why = ("a folder source lists its images sorted by path, which is not the order of a triplet file's objects, so "
           "object i would attach to whichever image sorts into slot i" if source.kind == "folder" else
           "object i would attach to image i of the source by position, unchecked")
    return (f"human.triplets: how the file's object ids attach to images is not declared ({why}); set "
            "human.concepts to the THINGS concept-order file (e.g. unique_id.txt, or things_concepts.tsv) with "
            "source.path the THINGS object_images/ tree (objects = concepts, images of object_images/<concept>/ "
            "averaged), or human.objects to a CSV 'object,image_id', or human.positional: true if image i of the "
            "source really is object i")


def object_mapping(h: HumanConfig, source: SourceConfig, src: sources.ImageSource, n_named: int = 0) -> ObjectMapping:
    """The declared mapping of `h` (concepts, table or positional) over the images of `src`.

    Raises `ConfigError` when none is declared (see `undeclared_message`), `InputError` when the
    mapping's file is unreadable or ties no image to any object."""
    if h.shipped is not None:
        return _shipped(src)
    if h.concepts is not None:
        return _from_concepts(h.concepts, src, h)
    if h.objects is not None:
        return _from_table(h.objects, src, n_named)
    if h.positional:
        return _build(np.arange(len(src)), len(src), "positional (declared: object i = image i of the source)",
                      [str(i) for i in range(len(src))], [], 0)
    raise ConfigError(undeclared_message(source))


def read_concepts(url: str) -> list[str]:
    """The concept names of a THINGS concept-order file, in order: one per line (`unique_id.txt`), or a
    CSV/TSV with a `uniqueID` column (`things_concepts.tsv`)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"human.concepts: file {url!r} does not exist") from None
    if url.lower().endswith((".tsv", ".csv")):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if url.lower().endswith(".tsv") else ",")
        fields = [c.strip() for c in reader.fieldnames or []]
        if CONCEPT_COLUMN not in fields:
            raise InputError(f"human.concepts: {url}: expected a '{CONCEPT_COLUMN}' column (the concept names, as the "
                             f"image folders are named), got {fields}")
        names = [(row.get(CONCEPT_COLUMN) or "").strip() for row in reader]
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not names or any(not n for n in names):
        raise InputError(f"human.concepts: {url}: expected one non-empty concept name per object, in THINGS order")
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if dup:
        raise InputError(f"human.concepts: {url}: {len(dup)} concept name(s) listed twice, e.g. {dup[:NAMED]}")
    return names


def _from_concepts(url: str, src: sources.ImageSource, h: HumanConfig | None = None) -> ObjectMapping:
    """Objects = concepts in file order; an image belongs to the concept its parent folder names. With
    h.stimulus triplet_image (the default) only each concept's triplet-task image does (`_stimuli`)."""
    names = read_concepts(url)
    index = {name: i for i, name in enumerate(names)}
    ids = src.ids().tolist()
    folders = [posixpath.basename(posixpath.dirname(i)) for i in ids]
    obj = np.asarray([index.get(f, -1) for f in folders], dtype=np.int64)
    unknown = sorted({f for f in folders if f not in index})
    if (obj < 0).all():
        raise InputError(f"human.concepts: no image of the source is in a folder named after a concept of {url!r} "
                         f"(expected object_images/<concept>/<concept>_NN.jpg); concepts e.g. {names[:NAMED]}, "
                         f"image folders e.g. {unknown[:NAMED] or ['(none: images directly in source.path)']}")
    if h is None or h.stimulus == "average":
        return _build(obj, len(names), f"THINGS concepts ({url}), every image of a concept averaged", names, unknown,
                      len(unknown))
    chosen = _stimuli(h, names, ids, obj)
    one = np.full_like(obj, -1)
    one[chosen] = obj[chosen]
    how = f"the images human.stimuli names ({h.stimuli})" if h.stimuli else "<concept>/<concept>.jpg"
    return _build(one, len(names), f"THINGS concepts ({url}), one triplet-task image per concept: {how}", names,
                  unknown, len(unknown))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _stimuli(h: HumanConfig, names: list[str], ids: list[str], obj: np.ndarray) -> np.ndarray:
    """Source rows of the triplet-task image of every concept that has images (one per concept).

    ids: the source's image ids; obj: (n,) the concept index of each image's folder (-1: none).
    The image is the one `h.stimuli` names (a file name in the concept's folder or a source image
    id), else the file whose stem is the concept's name. `InputError` (one line, naming the concept
    and what was looked for) when a concept with images has no such image."""
    rows_of: dict[int, list[int]] = {}
    for row, o in enumerate(obj.tolist()):
        if o >= 0:
            rows_of.setdefault(o, []).append(row)
    wanted = _read_stimuli(h.stimuli, names) if h.stimuli else {}
    chosen = []
    for o, rows in rows_of.items():
        concept = names[o]
        if h.stimuli:
            if concept not in wanted:
                raise InputError(f"human.stimuli: {h.stimuli}: names no image for concept {concept!r}, which has "
                                 f"{len(rows)} image(s) in the source (add a row '{concept},<image>')")
            target = wanted[concept]
            hit = [r for r in rows if posixpath.basename(ids[r]) == target or ids[r] == target]
            what = f"{target!r} (named by {h.stimuli})"
        else:
            hit = [r for r in rows if posixpath.splitext(posixpath.basename(ids[r]))[0] == concept
                   and posixpath.splitext(ids[r])[1].lower() in IMAGE_SUFFIXES]
            what = f"'{concept}/{concept}.jpg' (the THINGS triplet-task image, any image extension)"
        if len(hit) != 1:
            example = posixpath.basename(ids[rows[0]])
            raise InputError(f"human.stimulus: concept {concept!r} has {len(hit)} image(s) matching {what} among its "
                             f"{len(rows)} (e.g. {example!r}); name one per concept in human.stimuli, or set "
                             "human.stimulus: average to use every image")
        chosen.append(hit[0])
    return np.asarray(sorted(chosen), dtype=np.int64)


def _read_stimuli(url: str, names: list[str]) -> dict[str, str]:
    """concept → image name of a CSV/TSV with columns 'concept' and 'image' (concepts must be in `names`)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"human.stimuli: file {url!r} does not exist") from None
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if url.lower().endswith(".tsv") else ",")
    fields = [c.strip() for c in reader.fieldnames or []]
    if not {"concept", "image"} <= set(fields):
        raise InputError(f"human.stimuli: {url}: expected columns 'concept' and 'image', got {fields}")
    known = set(names)
    out: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        concept, image = (row.get("concept") or "").strip(), (row.get("image") or "").strip()
        if concept not in known or not image:
            raise InputError(f"human.stimuli: {url}: line {line}: " + (f"concept {concept!r} is not in human.concepts"
                             if concept not in known else "empty image"))
        if concept in out:
            raise InputError(f"human.stimuli: {url}: line {line}: concept {concept!r} named twice")
        out[concept] = image
    return out


def _from_table(url: str, src: sources.ImageSource, n_named: int = 0) -> ObjectMapping:
    """CSV `object,image_id`: object ids 0..m-1, image ids as in the source (unknown ids counted). The
    declared objects are those the table or the triplet file names (`n_named`: its largest id + 1): an
    object of the file that the table leaves out has no image."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise InputError(f"human.objects: file {url!r} does not exist") from None
    pairs: list[tuple[str, int]] = []
    for line, row in enumerate(rows, start=2):
        try:
            o, img = int(row["object"]), str(row["image_id"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"human.objects: {url}: line {line}: expected columns 'object' (int) and "
                             "'image_id'") from None
        if o < 0:
            raise InputError(f"human.objects: {url}: line {line}: object {o} is negative")
        pairs.append((img, o))
    obj, unknown = _tie(pairs, src)
    if (obj < 0).all():
        raise InputError(f"human.objects: {url}: no image_id is in the image source (e.g. line 2: image_id "
                         f"{unknown[0]!r} is not in {src.description}); ids are as the source names them, e.g. "
                         f"{src.ids()[:3].tolist()}" if unknown else f"human.objects: {url}: no rows")
    n_declared = max(max(int(r["object"]) for r in rows) + 1, n_named)
    return _build(obj, n_declared, f"table ({url})", [str(i) for i in range(n_declared)], unknown[:NAMED],
                  len(unknown))


def _tie(pairs: list[tuple[str, int]], src: sources.ImageSource) -> tuple[np.ndarray, list[str]]:
    """(object of each source image (n,) int64, -1 for none; the image ids of `pairs` the source lacks, in
    order) from (image id, object) pairs."""
    index = src.row_of
    obj = np.full(len(src), -1, dtype=np.int64)
    unknown: list[str] = []
    for img, o in pairs:
        if img in index:
            obj[index[img]] = o
        else:
            unknown.append(img)
    return obj, unknown


def _shipped(src: sources.ImageSource) -> ObjectMapping:
    """The shipped THINGS concepts over the demo emoji (`human.shipped: things`): each emoji of the shipped map
    stands for one concept (`things.one_concept_per_emoji`); a concept with two emoji averages them."""
    names = things.read_concepts()
    per_emoji = things.one_concept_per_emoji(things.read_emoji_map(concepts=names),
                                             {m["id"]: m["name"] for m in sources.demo_metadata()})
    obj, unknown = _tie(sorted(per_emoji.items()), src)
    if (obj < 0).all():
        raise InputError(f"human.shipped: none of the {len(per_emoji)} emoji of the shipped THINGS map is in "
                         f"{src.description}")
    return _build(obj, len(names), f"THINGS concepts of the shipped trials → demo emoji ({things.things_dir()}/"
                  "emoji_map.csv, one concept per emoji)", names, unknown[:NAMED], len(unknown))


def _build(obj: np.ndarray, n_declared: int, kind: str, names: list[str], unknown: list[str],
           n_unknown: int) -> ObjectMapping:
    """Renumber the declared objects that have images to 0..k-1 (in declared order) and summarise."""
    counts = np.bincount(obj[obj >= 0], minlength=n_declared)
    has = counts > 0
    compact_of = np.where(has, np.cumsum(has) - 1, -1).astype(np.int64)
    object_of_image = np.where(obj >= 0, compact_of[np.maximum(obj, 0)], -1).astype(np.int64)
    missing = np.flatnonzero(~has)
    kept = counts[has]
    summary = MappingSummary(
        kind=kind, n_declared=n_declared, n_objects=int(has.sum()),
        missing=[names[i] for i in missing[:NAMED]], n_missing=int(len(missing)),
        images_mapped=int((obj >= 0).sum()), images_unmapped=int((obj < 0).sum()),
        unknown=list(unknown[:NAMED]), n_unknown=int(n_unknown),
        images_per_object=(int(kept.min()), float(np.median(kept)), int(kept.max())))
    return ObjectMapping(object_of_image=object_of_image, compact_of=compact_of, summary=summary)
