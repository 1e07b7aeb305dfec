"""The review page of a scoring run: one self-contained HTML file (images inline as PNG), so it
can be mailed or archived beside the Parquet it summarises. Rendered with Jinja2
(``cxr/templates/report.html.j2``, autoescaped).

What it covers: by default the latest night, i.e. the current row of every input scored on the
latest date, whichever jobs wrote them (a killed run resumed is several jobs; one resumed after
midnight UTC starts a new date, so pass ``--job-id all`` or its jobs to see both halves); or one
job; or "all" current rows. Every screen-positive is listed, most probable first; flagged, skipped and
error rows each have their section. Heatmaps are drawn inside the lungs (the stored lung mask),
cropped to the film's own proportions (its stored size: the letterbox padding is removed), on
one colour scale for the page (each map's stored scale), with a legend.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from cxr.data.errors import BadImageError
from cxr.data.images import load_image
from cxr.data.storage import StorageConfig
from cxr.qc import BLOCKING
from cxr.scores_table import SCHEMA, SCORED_STATUSES, read_scores, rows_for

IMAGES = ("heatmap_png", "covid_heatmap_png", "lung_mask_png")     # read only for the rows shown
TEMPLATES = Path(__file__).parent / "templates"
COLOURS = matplotlib.colormaps["inferno"]


def read_job(scores: str, job_id: str | None, top: int, max_flagged: int, storage) -> pd.DataFrame:
    """The page's rows without images (``job_id`` None: the latest night's current rows; "all":
    every input's current row; else that job's rows), then the images of the rows ``shown``:
    the rest of the table's images are never read."""
    rows = rows_for(scores, job_id, storage, [n for n in SCHEMA.names if n not in IMAGES]).to_pandas()
    if rows.empty:
        return rows.assign(**{c: None for c in IMAGES})
    wanted = pd.concat(shown(rows, top, max_flagged))
    if wanted.empty:
        return rows.assign(**{c: None for c in IMAGES})
    where = pc.field("uri").isin(pa.array(wanted["uri"].unique().tolist(), pa.string()))
    images = read_scores(scores, storage, ["uri", "job_id", "scored_at", *IMAGES], filter=where).to_pandas()
    return rows.merge(images, on=["uri", "job_id", "scored_at"], how="left")


def shown(rows: pd.DataFrame, top: int, max_flagged: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(screen-positives, most probable first; the highest COVID probabilities among the other
    screened films; the flagged films): ``top``, ``top`` and ``max_flagged`` of them get images."""
    scored = rows[rows["status"].isin(SCORED_STATUSES)].sort_values("covid_probability", ascending=False)
    positive = scored["screen_positive"].fillna(False).astype(bool)
    return (scored[positive], scored[~positive & (scored["status"] == "ok")].head(top),
            scored[scored["status"] == "flagged"])


def _png_array(data) -> np.ndarray | None:
    return np.asarray(Image.open(io.BytesIO(data))) if isinstance(data, bytes) and data else None


def overlay_png(row: pd.Series | dict, size: int, storage: StorageConfig | None, page_scale: float,
                which: str = "covid") -> tuple[str, float | None]:
    """(the film with its ``which`` ("covid" or "predicted") heatmap over it as a data: URI,
    the share of the map outside the lungs or None). The map is drawn inside the lungs only, as
    transparent where it is 0, scaled by its own scale over ``page_scale``, and cropped to the
    film's proportions."""
    try:
        gray = load_image(row["uri"], size, storage)
    except (BadImageError, OSError):
        gray = np.full((size, size), 128, np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    heat = _png_array(row.get("covid_heatmap_png" if which == "covid" else "heatmap_png"))
    scale = row.get("covid_heatmap_scale" if which == "covid" else "heatmap_scale")
    outside = None
    if heat is not None:
        value = np.asarray(Image.fromarray(heat).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255
        if scale is not None and not pd.isna(scale) and page_scale > 0:
            value *= float(scale) / page_scale
        lungs = _png_array(row.get("lung_mask_png"))
        if lungs is not None:
            inside = np.asarray(Image.fromarray(lungs).resize((size, size), Image.Resampling.NEAREST)) > 127
            total = float(value.sum())
            outside = float(value[~inside].sum()) / total if total > 0 else 0.0
            value = value * inside
        colour = COLOURS(np.clip(value, 0, 1))[..., :3] * 255
        alpha = np.clip(value, 0, 1)[..., None] * 0.7
        rgb = (1 - alpha) * rgb + alpha * colour
    h, w = row.get("image_height"), row.get("image_width")
    if h and w and not pd.isna(h) and not pd.isna(w):       # remove the letterbox padding
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        top, left = (size - nh) // 2, (size - nw) // 2
        rgb = rgb[top:top + nh, left:left + nw]
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), outside


def legend_png(page_scale: float) -> str:
    """The shared colour scale, 0 .. ``page_scale`` (Grad-CAM, logit units per position)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 0.6), dpi=100)
    fig.subplots_adjust(bottom=0.5, top=0.95, left=0.03, right=0.97)
    matplotlib.colorbar.ColorbarBase(ax, cmap=COLOURS, orientation="horizontal",
                                     norm=matplotlib.colors.Normalize(0, page_scale))
    ax.tick_params(labelsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _screen_result(row) -> str:
    if row["qc_flags"] is not None and set(row["qc_flags"]) & BLOCKING:
        return "not screened: not a frontal adult chest film"
    if pd.isna(row["covid_threshold"]) or pd.isna(row["screen_positive"]):
        return "no threshold"
    t = row["covid_threshold"]
    result = f"positive (>= {t:.3f})" if row["screen_positive"] else f"negative (< {t:.3f})"
    return result + (", flagged for review" if row["status"] == "flagged" else "")


def _counts(values: pd.Series) -> list[tuple[str, int]]:
    return [(str(k), int(v)) for k, v in values.value_counts().items()]


def _records(rows: pd.DataFrame, columns: list[str]) -> list[dict]:
    out = rows.reindex(columns=columns).astype(object).where(rows.reindex(columns=columns).notna(), None)
    return out.to_dict("records")


def render(rows: pd.DataFrame, title: str, top: int, max_flagged: int, size: int,
           storage: StorageConfig | None = None, scope: str = "", monitoring: dict | None = None) -> str:
    """The whole page for ``rows`` (as ``read_job`` gives them); ``monitoring``, the section
    ``cxr.workflows.monitor.page_section`` gives."""
    positives, highest, flagged = shown(rows, top, max_flagged)
    scored = rows[rows["status"].isin(SCORED_STATUSES)]
    drawn = pd.concat([positives.head(top), highest, flagged.head(max_flagged)])
    scales = pd.concat([drawn["covid_heatmap_scale"], flagged.head(max_flagged)["heatmap_scale"]]).dropna()
    page_scale = float(scales.max()) if len(scales) else 1.0

    def cards(subset: pd.DataFrame, which: str) -> list[dict]:
        out = []
        for rank, (_, r) in enumerate(subset.iterrows(), 1):
            image, outside = overlay_png(r, size, storage, page_scale, which)
            probs = ", ".join(f"{label} {p:.2f}" for label, p in zip(r["labels"], r["probabilities"]))
            has_map = isinstance(r.get("covid_heatmap_png" if which == "covid" else "heatmap_png"), bytes)
            out.append({**r.to_dict(), "rank": rank, "image": image, "outside": outside, "probabilities": probs,
                        "has_map": has_map,
                        "qc_flags": list(r["qc_flags"]) if r["qc_flags"] is not None else [],
                        "covid_map": "COVID-19", "predicted_map": f"{r['heatmap_label']} (the predicted class)"})
        return out

    flags = pd.Series([f for fs in scored["qc_flags"] for f in fs], dtype=object)
    summary = [("status", _counts(rows["status"])), ("quality flag", _counts(flags)),
               ("predicted label", _counts(scored["predicted_label"])),
               ("COVID-19 screen at the card threshold", _counts(scored.apply(_screen_result, axis=1))
                if len(scored) else [])]
    models = rows[["segmenter_name", "segmenter_version", "classifier_name", "classifier_version"]].drop_duplicates()
    positive_list = positives.assign(rank=range(1, len(positives) + 1))
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html.j2").render(
        title=title, scope=scope or f"{len(rows)} images; jobs: {', '.join(sorted(rows['job_id'].unique()))}.",
        models="; ".join(f"{m.segmenter_name} v{m.segmenter_version} + {m.classifier_name} v{m.classifier_version}"
                         for m in models.itertuples()),
        summary=summary, legend=legend_png(page_scale), top=top, max_flagged=max_flagged,
        positives=cards(positives.head(top), "covid") + _records(positive_list.iloc[top:], list(positive_list.columns)),
        highest=cards(highest, "covid"), flagged=cards(flagged.head(max_flagged), "predicted")
        + _records(flagged.iloc[max_flagged:], list(flagged.columns)),
        skipped=_records(rows[rows["status"] == "skipped"], ["uri", "skip_reason", "modality", "view_position",
                                                              "body_part_examined"]),
        errors=_records(rows[rows["status"] == "error"], ["uri", "error"]),
        monitoring=_monitoring(monitoring))


def _monitoring(section: dict | None) -> dict:
    """The page's monitoring section: each night's alarms and comparisons, the trend as a PNG."""
    section = dict(section or {"nights": [], "trend": None, "trend_rows": [], "note": "not requested"})
    figure = section.pop("trend", None)
    section["trend_png"] = None
    if figure is not None:
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        plt.close(figure)
        section["trend_png"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return section
