"""The review page of a scoring run: one self-contained HTML file (images inline as PNG), so it
can be mailed or archived beside the Parquet it summarises."""

from __future__ import annotations

import base64
import html
import io

import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from cxr.data.errors import BadImageError
from cxr.data.images import load_image
from cxr.data.storage import StorageConfig
from cxr.scores_table import SCHEMA, latest_job, read_scores

STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:230px;font-size:12px;word-break:break-all}
.card img{width:224px;height:224px}.flag{color:#b00}"""
SCORED = ("ok", "flagged")        # run through the models (skipped and error rows were not)


def read_job(scores: str, job_id: str | None, top: int, max_flagged: int, storage) -> pd.DataFrame:
    """The rows of ``job_id`` (the latest job if None; every row for "all"), without heatmaps,
    then the heatmaps of the rows the page shows: the rest of the table is never read."""
    job_id = latest_job(scores, storage) if job_id is None else job_id
    only = None if job_id == "all" else pc.field("job_id") == job_id
    columns = [n for n in SCHEMA.names if n != "heatmap_png"]
    rows = read_scores(scores, storage, columns, filter=only).to_pandas() if job_id else pd.DataFrame(columns=columns)
    wanted = pd.concat(shown(rows, top, max_flagged))["uri"].unique().tolist() if len(rows) else []
    if not wanted:
        return rows.assign(heatmap_png=None)
    where = pc.field("uri").isin(pa.array(wanted, pa.string()))
    heatmaps = read_scores(scores, storage, ["uri", "job_id", "scored_at", "heatmap_png"],
                           filter=where if only is None else where & only).to_pandas()
    return rows.merge(heatmaps, on=["uri", "job_id", "scored_at"], how="left")


def overlay_png(uri: str, heatmap_png: bytes | None, size: int, storage: StorageConfig | None) -> str:
    """The letterboxed image with its heatmap blended over it, as a data: URI."""
    try:
        gray = load_image(uri, size, storage)
    except (BadImageError, OSError):
        gray = np.full((size, size), 128, np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if isinstance(heatmap_png, bytes) and heatmap_png:      # NaN where the heatmap was not read
        heat = np.asarray(Image.open(io.BytesIO(heatmap_png)).resize((size, size), Image.Resampling.BILINEAR))
        colour = matplotlib.colormaps["jet"](heat / 255.0)[..., :3] * 255
        rgb = 0.6 * rgb + 0.4 * colour
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(counts: pd.Series, header: str) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in counts.items())
    return f"<table><tr><th>{header}</th><th>images</th></tr>{body}</table>"


def _cards(rows: pd.DataFrame, size: int, storage: StorageConfig | None) -> str:
    cards = []
    for _, r in rows.iterrows():
        probs = ", ".join(f"{label} {p:.2f}" for label, p in zip(r["labels"], r["probabilities"]))
        flags = f"<div class=flag>{html.escape(', '.join(r['qc_flags']))}</div>" if len(r["qc_flags"]) else ""
        cards.append(f"<div class=card><img src='{overlay_png(r['uri'], r['heatmap_png'], size, storage)}'>"
                     f"<div><b>{html.escape(str(r['predicted_label']))}</b> ({probs})</div>"
                     f"<div>lung fraction {r['lung_fraction']:.2f}</div>{flags}"
                     f"<div>{html.escape(r['uri'])}</div></div>")
    return "<div class=grid>" + "".join(cards) + "</div>" if cards else "<p>none</p>"


def _screening_counts(scored: pd.DataFrame) -> pd.Series:
    """Screen-positive / negative counts per classifier threshold; rows without one (older
    schema, or a card without an operating point) count as "no threshold"."""
    def label(threshold, positive) -> str:
        if pd.isna(threshold) or pd.isna(positive):
            return "no threshold"
        return f"positive (>= {threshold:.3f})" if positive else f"negative (< {threshold:.3f})"

    return pd.Series([label(t, p) for t, p in zip(scored["covid_threshold"], scored["screen_positive"])],
                     dtype=object).value_counts()


def shown(rows: pd.DataFrame, top: int, max_flagged: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows the page shows with images: the highest COVID probabilities, and the flagged."""
    scored = rows[rows["status"].isin(SCORED)]
    return (scored.sort_values("covid_probability", ascending=False).head(top),
            rows[rows["status"] == "flagged"].head(max_flagged))


def render(rows: pd.DataFrame, title: str, top: int, max_flagged: int, size: int,
           storage: StorageConfig | None = None) -> str:
    """The whole page for ``rows`` (scores as read by ``cxr.scores_table.read_scores``; the
    ``heatmap_png`` of the rows ``shown`` is enough)."""
    scored = rows[rows["status"].isin(SCORED)]
    highest, flagged = shown(rows, top, max_flagged)
    errors, skipped = rows[rows["status"] == "error"], rows[rows["status"] == "skipped"]
    models = rows[["segmenter_name", "segmenter_version", "classifier_name", "classifier_version"]].drop_duplicates()
    error_rows = "".join(f"<tr><td>{html.escape(r.uri)}</td><td>{html.escape(str(r.error))}</td></tr>"
                         for r in errors.itertuples())
    skipped_rows = "".join(f"<tr><td>{html.escape(r.uri)}</td><td>{html.escape(str(r.skip_reason))}</td></tr>"
                           for r in skipped.itertuples())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p><b>Research use, not for diagnosis.</b> {len(rows)} images; jobs: {html.escape(', '.join(sorted(rows['job_id'].unique())))}.</p>
<p>Models: {html.escape('; '.join(f'{m.segmenter_name} v{m.segmenter_version} + {m.classifier_name} v{m.classifier_version}' for m in models.itertuples()))}</p>
<h2>Summary</h2><div class=grid>{_table(rows['status'].value_counts(), 'status')}
{_table(scored['predicted_label'].value_counts(), 'predicted label')}
{_table(_screening_counts(scored), 'COVID screen at the card threshold')}</div>
<h2>Highest COVID-19 probability ({len(highest)})</h2>{_cards(highest, size, storage)}
<h2>Flagged by quality control ({len(rows[rows['status'] == 'flagged'])}, showing {len(flagged)})</h2>{_cards(flagged, size, storage)}
<h2>Skipped: not a frontal chest radiograph ({len(skipped)})</h2><table><tr><th>uri</th><th>reason</th></tr>{skipped_rows}</table>
<h2>Errors ({len(errors)})</h2><table><tr><th>uri</th><th>error</th></tr>{error_rows}</table>
</body></html>"""
