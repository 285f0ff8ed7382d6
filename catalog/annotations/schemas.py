"""Pydantic schemas of annotations: the API contract (and the fields of an annotation export row)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from catalog.store.models import HUMAN_LABELS

HumanLabel = Literal[HUMAN_LABELS]  # type: ignore[valid-type]
MAX_DESCRIPTION = 2000
MAX_EXAMPLES = 50


class Example(BaseModel):
    """A trigger example that shows the pattern: a (document, position) among the neuron's triggers."""

    model_config = ConfigDict(extra="forbid")

    document: int = Field(ge=0, le=2**62)
    position: int = Field(ge=0, le=2**31 - 1)


class AnnotationWrite(BaseModel):
    """A new annotation (``base_revision`` null) or a revision of mine (``base_revision`` = the latest)."""

    model_config = ConfigDict(extra="forbid")

    label: HumanLabel = Field(description="shallow | semantic | shallow+semantic | none (no clear pattern).")
    description: str = Field("", max_length=MAX_DESCRIPTION, description=(
        "The pattern the trigger prefixes share, e.g. \"ends with 'substitutes'\" or \"a time range\"; "
        "required unless the label is none."))
    examples: list[Example] = Field(default_factory=list, max_length=MAX_EXAMPLES,
                                    description="Trigger examples (document, position) that show the pattern.")
    base_revision: int | None = Field(None, ge=1, le=2**31 - 1, description=(
        "The revision this edit is based on (the latest one); null to write the first. A stale base answers 409."))


class AnnotationRead(BaseModel):
    """One annotator's current annotation of one neuron."""

    model: str
    layer: int
    neuron: int
    annotator: str
    revision: int = Field(description="Number of the latest revision (1-based); send it as base_revision to revise.")
    label: HumanLabel
    description: str
    examples: list[Example]
    run_id: int | None = Field(description="The run the latest revision was made on.")
    weights_sha256: str | None
    on_other_weights: bool = Field(description="Made on weights other than the current run's (re-extracted "
                                   "from a different checkpoint): the neuron may not be the same.")
    created_at: datetime
    updated_at: datetime


class RevisionRead(BaseModel):
    revision: int
    label: HumanLabel
    description: str
    examples: list[Example]
    run_id: int | None
    weights_sha256: str | None
    created_at: datetime


class AnnotationHistory(BaseModel):
    annotation: AnnotationRead
    revisions: list[RevisionRead] = Field(description="Every revision, oldest first.")


class QueueLayer(BaseModel):
    layer: int
    mine: int = Field(description="Neurons of this layer I have annotated.")
    quota: int | None = Field(description="How many the queue draws from this layer (null: no limit).")


class QueueItem(BaseModel):
    """The next neuron of a review queue (null when the queue is done) and where I stand."""

    queue: Literal["first", "second"]
    layer: int | None
    neuron: int | None
    done: bool
    progress: list[QueueLayer]
    others: int = Field(default=0, description="Second-opinion queue: how many others annotated this neuron.")


class KappaFigure(BaseModel):
    items: int = Field(description="Neurons labelled by at least two annotators.")
    annotators: int
    method: Literal["cohen", "fleiss"] | None = Field(description="Cohen's kappa for two annotators, Fleiss' for more.")
    kappa: float | None = Field(description="Null when undefined (fewer than 2 items with two labels, or one label only).")
    observed_agreement: float | None


class SuggestedMatch(BaseModel):
    annotations: int = Field(description="Current human labels on neurons that have a suggested label.")
    matches: int
    rate: float | None


class LayerAgreement(BaseModel):
    layer: int
    between_annotators: KappaFigure
    with_suggested: SuggestedMatch


class PairKappa(BaseModel):
    annotators: tuple[str, str]
    items: int
    kappa: float | None


class AgreementReport(BaseModel):
    model: str
    overall: KappaFigure
    with_suggested: SuggestedMatch
    layers: list[LayerAgreement]
    pairs: list[PairKappa] = Field(description="Cohen's kappa for every pair of annotators over the neurons both labelled.")


class AnnotatorRead(BaseModel):
    name: str
    created_at: datetime
    active: bool


class NewAnnotator(BaseModel):
    name: str
    token: str = Field(description="Shown once; only its SHA-256 is stored.")
