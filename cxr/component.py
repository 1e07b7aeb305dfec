"""A loaded model with its card and where it came from: what a screen is built of. Its own
module (no model code, no I/O) so that the card's Markdown and the package files can both name
it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cxr.card import ModelCard

if TYPE_CHECKING:        # torch loads where weights are read or written
    from torch import nn

    from cxr.monitoring import Reference
    from cxr.qc import QualityModel


@dataclass(frozen=True)
class Component:
    """A loaded model with its card and where it came from (registry name and version)."""

    model: nn.Module
    card: ModelCard
    name: str | None = None
    version: str | None = None
    qc: QualityModel | None = None      # a classifier's quality control (cxr.qc), kept beside its weights
    reference: Reference | None = None  # the screen's answers on its validation films (cxr.monitoring), likewise
