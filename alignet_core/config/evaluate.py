"""The `evaluate` section of the config (stage 5)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignet_core.config.human import ProxyLevel, renamed_level_message
from alignet_core.records import ConfigModel

#: the AligNet paper's Levels subsets (human-judged triplets): a file set may declare it holds one of them
PaperLevel = Literal["global", "local", "class_boundary"]


class EvalSetConfig(ConfigModel):
    """An evaluation set of odd-one-out triplets from a file the pipeline did not make."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the set's column name in reports")
    triplets: str = Field(description="THINGS-format file: rows 'i j k' of image rows (0-based, source order), "
                          "k the odd one out")
    probabilities: str | None = Field(None, description=".npy (n, 3) human choice probabilities of the pairs "
                                      "(i,j), (i,k), (j,k) of each row (optional): the per-triplet response "
                                      "distribution; with it every model's expected agreement with a person's "
                                      "choice is scored (docs/your-data.md)")
    paper_level: PaperLevel | None = Field(
        None, description="declare that the file holds the AligNet paper's Levels triplets of this kind (human-judged, "
        "with `probabilities` their response distributions): only then are the paper's Levels figures printed beside "
        "the set's expected agreement; null: no paper figure"
    )

    @model_validator(mode="after")
    def _paper_level_needs_distributions(self) -> "EvalSetConfig":
        if self.paper_level is not None and self.probabilities is None:
            raise ValueError(f"evaluate.sets[{self.name}].paper_level: the paper's Levels figures are agreement with "
                             "human choices; give the per-triplet response distributions as probabilities")
        return self


class EvaluateConfig(ConfigModel):
    """The evaluation stage: alignment of the teacher and the student, before and after, on three
    taxonomy levels (taxonomy answer, ceiling 100%), on held-out human (or proxy) triplets and on any
    given set (the AligNet paper's Levels figures only beside a set declared `paper_level`)."""

    enabled: bool = Field(True, description="false: no evaluation stage")
    levels: list[ProxyLevel] = Field(
        default_factory=lambda: ["category_boundary", "sibling_boundary", "class_boundary"],
        description="taxonomy-answer sets (ceiling 100%; not the AligNet paper's human-judged Levels) to build from the "
        "source's two-level taxonomy, over the test fold's images (alignet_core.human.levels)",
    )
    n_per_level: int = Field(1000, gt=0, description="triplets per level")
    student: str | None = Field(
        None, description="a distillation output folder (student.safetensors, head.safetensors, train_log.json) of "
        "distill.student to evaluate; null: the pipeline's own student (none when distill is disabled)"
    )
    sets: list[EvalSetConfig] = Field(default_factory=list, description="more evaluation sets from files")
    batch_size: int = Field(128, gt=0, description="images per forward pass when the students embed them")
    saliency_maps: str | None = Field(
        None, description="the 'where' metric: 'proxy' (the demo's blurred alpha silhouettes, a proxy) or a folder of "
        "<image id>.png/.npy importance maps; Spearman and top-10% IoU/Dice of the raw and finetuned students' "
        "saliency against them on test-fold images the distillation did not train on; null: off",
    )
    saliency_images: int = Field(256, gt=0, description="at most this many images for the 'where' metric")

    @field_validator("levels", mode="before")
    @classmethod
    def _renamed_levels(cls, v: object) -> object:
        if msg := renamed_level_message("evaluate.levels", v):
            raise ValueError(msg)
        return v
