"""Each night against the model's own reference: did tonight's films look like the films the
model was validated on?

- **The reference** (``Reference``) is stored with the classifier (``reference.json`` beside its
  weights) when it is registered: the screen's answers on its validation films, as decile bins
  of each measure (``MEASURES``: the COVID-19 probability, the lung fraction, every
  quality-control score of ``cxr.qc.SIGNALS``) and the shares of flagged and screen-positive
  films. Bins, not the films' values: a few hundred bytes per measure, and no image-level data
  leaves the training run.
- **A night** is compared bin by bin (``compare``) with two figures per measure:
  the **population stability index** (PSI, the size of the shift: 0.1 is commonly read as a
  moderate shift, 0.25 as a major one) and a **chi-square test of homogeneity**
  (``scipy.stats.chi2_contingency``) of the reference's and the night's bin counts: a two-sample
  test, because the reference is a sample too (a few hundred films), not the truth. A measure
  has drifted when both say so: PSI above its limit (a shift big enough to matter) and p below
  alpha (not the noise of a small night: PSI alone reads about bins/n on an unshifted night of
  n films, 0.3 at 30). A test alone would flag trivial shifts on a night of 100,000 films.
  Why not Evidently, NannyML or whylogs: each brings a dependency tree larger than the stack
  (plotting, NLP, their own storage) for the two formulas here, which are a few lines of NumPy
  and one SciPy call.

Only rows run through the models (``ok`` and ``flagged``) are measured; the error share is
checked on its own (``cxr.workflows.monitor``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr.qc import SIGNALS
from cxr.scores_table import SCHEMA, SCORED_STATUSES

REFERENCE_FILE = "reference.json"
BINS = 10
# Continuous measures get decile bins; the binary ones two bins (no, yes).
CONTINUOUS = ("covid_probability", "lung_fraction", *(f"qc.{name}" for name in SIGNALS))
BINARY = ("flagged", "screen_positive")
MEASURES = (*CONTINUOUS, *BINARY)
# The columns ``measure_values`` reads.
COLUMNS = ["status", "covid_probability", "lung_fraction", "qc_signals", "screen_positive"]
# Added to every bin's count before shares are taken, so an empty bin has a finite log in PSI.
SMOOTHING = 0.5


@dataclass(frozen=True)
class Distribution:
    """One measure's reference: the inner bin edges (values equal to an edge fall in the upper
    bin) and how many reference films fell in each bin."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    @property
    def shares(self) -> np.ndarray:
        return _shares(np.asarray(self.counts))


@dataclass(frozen=True)
class Reference:
    measures: dict[str, Distribution]
    source: str = ""                 # what the reference films were (a manifest and its split)
    created_at: str = ""
    version: int = 1

    def without(self, *names: str) -> "Reference":
        """The reference less the measures a change made stale (a new temperature or threshold
        moves the COVID-19 probability and the screen-positive share, not the films)."""
        return Reference({k: v for k, v in self.measures.items() if k not in names}, self.source, self.created_at,
                         self.version)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Reference":
        raw = json.loads(text)
        measures = {name: Distribution(tuple(float(e) for e in d["edges"]), tuple(int(c) for c in d["counts"]))
                    for name, d in raw["measures"].items()}
        for name, d in measures.items():
            if len(d.counts) != len(d.edges) + 1 or list(d.edges) != sorted(d.edges) or min(d.counts, default=0) < 0:
                raise ValueError(f"measure {name}: {len(d.edges)} edges (sorted: {list(d.edges) == sorted(d.edges)}) "
                                 f"for {len(d.counts)} bins")
        return cls(measures, raw.get("source", ""), raw.get("created_at", ""), int(raw.get("version", 1)))


@dataclass(frozen=True)
class Limits:
    """When a measure has drifted (``ScoreConfig``'s ``drift_*`` options)."""

    psi: float = 0.25
    alpha: float = 0.001
    min_images: int = 30


@dataclass
class Comparison:
    measure: str
    n: int
    psi: float | None = None
    p_value: float | None = None
    drifted: bool = False
    night_shares: list[float] = field(default_factory=list)
    reference: Distribution | None = None
    note: str = ""


def measure_values(table: pa.Table) -> dict[str, np.ndarray]:
    """Each measure's finite values over the rows run through the models."""
    scored = table.filter(pc.is_in(table["status"], pa.array(SCORED_STATUSES)))
    out: dict[str, np.ndarray] = {}
    for name in ("covid_probability", "lung_fraction"):
        out[name] = _finite(scored[name])
    if "qc_signals" in scored.column_names:
        signals = scored["qc_signals"].combine_chunks()
        for name in SIGNALS:
            if isinstance(signals.type, pa.StructType) and signals.type.get_field_index(name) >= 0:
                out[f"qc.{name}"] = _finite(pc.struct_field(signals, name))
    out["flagged"] = pc.equal(scored["status"], "flagged").cast(pa.float64()).to_numpy()
    out["screen_positive"] = pc.drop_null(scored["screen_positive"]).cast(pa.float64()).to_numpy()
    return {k: v for k, v in out.items() if len(v)}


def answers_table(frame) -> pa.Table:
    """The columns ``measure_values`` reads, from ``Screen.predict``'s frame of scores rows."""
    return pa.Table.from_pydict({c: frame[c].tolist() for c in COLUMNS},
                                schema=pa.schema([SCHEMA.field(c) for c in COLUMNS]))


def _finite(column) -> np.ndarray:
    values = np.asarray(pc.fill_null(pc.cast(column, pa.float64()), math.nan).to_numpy(zero_copy_only=False),
                        np.float64)
    return values[np.isfinite(values)]


def fit_reference(values: dict[str, np.ndarray], source: str, created_at: str = "") -> Reference:
    """Bins of each measure with values: deciles (fewer where values tie) for the continuous
    ones, no/yes for the binary ones."""
    measures = {}
    for name, v in values.items():
        if name not in MEASURES or not len(v):
            continue
        if name in BINARY:
            edges = (0.5,)
        else:
            edges = tuple(float(e) for e in np.unique(np.quantile(v, np.linspace(0, 1, BINS + 1)[1:-1])))
        measures[name] = Distribution(edges, tuple(int(c) for c in _counts(v, edges)))
    return Reference(measures, source, created_at)


def _counts(values: np.ndarray, edges) -> np.ndarray:
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)


def _shares(counts: np.ndarray) -> np.ndarray:
    smoothed = counts + SMOOTHING
    return smoothed / smoothed.sum()


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors (both without zeros)."""
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def compare(reference: Reference, values: dict[str, np.ndarray], limits: Limits = Limits()) -> list[Comparison]:
    """Each reference measure against the night's values (``measure_values``)."""
    from scipy.stats import chi2_contingency

    out = []
    for name, ref in reference.measures.items():
        v = values.get(name, np.empty(0))
        if len(v) == 0 or len(v) < limits.min_images:
            out.append(Comparison(name, len(v), reference=ref,
                                  note=f"{len(v)} films: too few to judge (at least {limits.min_images})"))
            continue
        counts = _counts(v, ref.edges)
        value = psi(ref.shares, _shares(counts))
        table = np.array([ref.counts, counts])
        table = table[:, table.sum(axis=0) > 0]          # a bin empty in both says nothing
        p = float(chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
        out.append(Comparison(name, len(v), value, p, value > limits.psi and p < limits.alpha,
                              [float(s) for s in counts / counts.sum()], ref))
    return out
