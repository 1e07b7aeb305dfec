"""The model card for people: short Markdown (a registered version's description, a bundle's
MODEL_CARD.md) from the typed card. The full card stays the JSON artifact."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import jinja2

from cxr.card import ModelCard

if TYPE_CHECKING:
    from cxr.component import Component

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _interval(v: object) -> str:
    """A value with its 95% interval, or n/a where any end is missing or not finite."""
    if not isinstance(v, dict):
        return "n/a"
    ends = [v.get(k) for k in ("value", "low", "high")]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in ends):
        return "n/a"
    return f"{ends[0]:.3f} [{ends[1]:.3f}, {ends[2]:.3f}]"


_ENV.filters["ci"] = _interval
_ENV.filters["num"] = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

_MODEL = _ENV.from_string("""\
# {{ card.architecture }} {{ card.task }}{% if name %} ({{ name }}{% if version %} v{{ version }}{% endif %}){% endif %}


**Intended use: {{ card.intended_use }}.**

{% if card.task == "classifier" %}
Tells {{ card.labels | join(" / ") }} apart on chest X-rays.
{% else %}
Finds the lungs on chest X-rays (one probability per pixel; >= 0.5 is lung).
{% endif %}

| input | |
|---|---|
| image | 8-bit grayscale, letterboxed to {{ p.letterbox_size }} px (padding {{ p.letterbox_fill }}) |
| lung mask | {% if p.lung_mask %}yes: {{ p.segmenter_name }} v{{ p.segmenter_version }}, dilated {{ p.dilation_px }} px{% else %}no{% endif %} |
| normalisation | x/255, mean {{ p.mean | list }}, std {{ p.std | list }} |
{% if card.operating_point %}
| operating point | {{ card.operating_point.label }} probability >= {{ "%.4f" | format(card.operating_point.threshold) }} (specificity >= {{ card.operating_point.min_specificity }} on {{ card.operating_point.chosen_on }}){% if card.operating_point.temperature != 1 %}, probabilities calibrated with temperature {{ "%.3f" | format(card.operating_point.temperature) }}{% endif %} |
{% endif %}
{% if card.init %}| initialised from | {{ card.init }} |
{% endif %}
{% if card.provenance.get("tuned_by") %}| settings tuned by | {{ card.provenance.tuned_by }} |
{% endif %}
{% if card.provenance.get("code") %}| code | cxr {{ card.provenance.code.cxr }}, commit `{{ (card.provenance.code.commit or "unknown")[:12] }}`{% if card.provenance.code.dirty %} with uncommitted changes{% endif %} |
{% endif %}

{% if card.training_data %}
## Data
{% for d in card.training_data %}
- {{ d.name }}: `{{ d.uri }}`{% if d.rows %}, {{ d.rows }} rows{% endif %}, sha256 `{{ d.sha256[:16] }}`{% if d.images %}; learnt from {{ d.images | length }} images{% if d.archives %} of {{ d.archives | length }} archives{% endif %}{% endif %}

{% endfor %}
{% endif %}

{% if test %}
## Test metrics (95% bootstrap intervals)
| metric | value |
|---|---|
{% set metrics = test.get("metrics") or {} %}
{% for key, label in headline if key in metrics %}
| {{ label }} | {{ metrics[key] | ci }} |
{% endfor %}
{% set adult = test.get("adult") %}
{% if adult is mapping %}
| adult images (n={{ adult.get("n", "?") }}): COVID sensitivity | {{ adult.covid_sensitivity | ci }} |
| adult images: COVID specificity | {{ adult.covid_specificity | ci }} |
{% endif %}
{% set screening = test.get("screening") %}
{% if screening is mapping %}
{% for population in ("all", "adult") if screening.get(population) is mapping %}
| at the operating point, {{ population }}: sensitivity | {{ screening[population].get("sensitivity") | ci }} |
| at the operating point, {{ population }}: specificity | {{ screening[population].get("specificity") | ci }} |
{% endfor %}
{% endif %}
{% for archive, v in ((screening if screening is mapping else {}).get("archives") or {}).items() if v is mapping %}
| at the operating point, archive {{ archive }} ({{ v.get("n_covid", "?") }} COVID / {{ v.get("n_other", "?") }} other): sensitivity, specificity | {{ v.get("sensitivity") | ci }}, {{ v.get("specificity") | ci }} |
{% endfor %}
{% for group, v in (test.get("covid_auroc_within") or {}).items() if v is mapping %}
| COVID AUROC within {{ group }} ({{ v.get("n_positive", "?") }} vs {{ v.get("n_negative", "?") }}) | {{ v | ci }} |
{% endfor %}
{% endif %}
{% if cross %}
## Cross-archive figures (leave-one-archive-out, recipe {{ cross.get("recipe", "?") }}; 95% bootstrap intervals)
Each archive is reported by a model trained, calibrated and thresholded without it{% if cross.get("rule") %} (threshold: {{ cross.get("rule") }}){% endif %}.

| held-out archive | COVID / other | AUROC | sensitivity | specificity |
|---|---|---|---|---|
{% for r in cross.get("held_out") or [] if r is mapping and r.get("report") is mapping %}
| {{ r.get("archive", "?") }} | {{ r.report.get("n_covid", "?") }} / {{ r.report.get("n_other", "?") }} | {{ r.report.get("auroc") | ci }} | {{ r.report.get("sensitivity") | ci }} | {{ r.report.get("specificity") | ci }} |
{% endfor %}
{% endif %}
{% if op %}
## The operating point: chosen on archives each fold never saw (rule: {{ op.get("rule", "?") }})
The threshold gives specificity {{ op.get("specificity", "?") }} on {{ op.get("n_adult_negatives", "?") }} adult films without
COVID-19, pooled over every held-out archive, each predicted by the fold trained without its archive
({{ op.get("n_covid", "?") }} COVID-19 films of held-out origins beside them). Chosen as {{ op.get("why", "?") }}.
Pooled figures below are each archive's at the threshold the rule picks from the other archives alone.

| rule | threshold | pooled specificity, adult films without COVID-19 | pooled sensitivity, COVID-19 films |
|---|---|---|---|
{% for rule, r in (op.get("rules") or {}).items() if r is mapping %}
| {{ rule }} | {{ r.get("threshold") | num }} | {{ (r.get("pooled_unseen") or {}).get("specificity_adult_negatives") | ci }} (n={{ ((r.get("pooled_unseen") or {}).get("specificity_adult_negatives") or {}).get("n", "?") }}) | {{ (r.get("pooled_unseen") or {}).get("sensitivity_covid") | ci }} (n={{ ((r.get("pooled_unseen") or {}).get("sensitivity_covid") or {}).get("n", "?") }}) |
{% endfor %}

| archive (rule {{ op.get("rule", "?") }}) | COVID / other | threshold without it | sensitivity | specificity |
|---|---|---|---|---|
{% for archive, r in (op.get("per_archive") or {}).items() if r is mapping %}
| {{ archive }} | {{ r.get("n_covid", "?") }} / {{ r.get("n_other", "?") }} | {{ r.get("threshold_without_it") | num }} | {{ r.get("sensitivity") | ci }} | {{ r.get("specificity") | ci }} |
{% endfor %}
{% endif %}
{% if calibration %}
## Calibrated for a site (cxr calibrate; 95% bootstrap intervals, on the sample it was fitted to)
| site | sample | COVID / other | sensitivity | specificity |
|---|---|---|---|---|
{% set after = calibration.get("after") if calibration.get("after") is mapping else {} %}
| {{ calibration.get("site", "?") }} | `{{ (calibration.get("sample_sha256") or "?")[:16] }}` | {{ calibration.get("n_covid", "?") }} / {{ calibration.get("n_other", "?") }} | {{ after.get("sensitivity") | ci }} | {{ after.get("specificity") | ci }} |
{% endif %}
{% if dice %}
## Test Dice
| subset | mean | median | 5th percentile | n |
|---|---|---|---|---|
{% for source, s in dice.items() if s is mapping %}
| {{ source }} | {{ s.get("mean") | num }} | {{ s.get("median") | num }} | {{ s.get("p05") | num }} | {{ s.get("n", "?") }} |
{% endfor %}
{% endif %}

## Limits
- Trained and tested on curated public collections; figures on an archive the model never saw
  can be much lower (see docs/RESULTS.md of cxr). Check it on your own archive first.
- Not a medical device. {{ card.intended_use | capitalize }}.

Run `{{ card.run_id or "n/a" }}`, commit `{{ (card.git_commit or "n/a")[:12] }}`, card version {{ card.card_version }}.
""")

_HEADLINE = [("accuracy", "accuracy"), ("f1_covid", "COVID F1"), ("covid_sensitivity", "COVID sensitivity"),
             ("covid_specificity", "COVID specificity"), ("auroc_covid", "COVID AUROC"), ("auroc_macro", "macro AUROC")]


def model_markdown(card: ModelCard, name: str | None = None, version: str | None = None) -> str:
    test = card.metrics.get("test") if card.task == "classifier" else None
    dice = card.metrics.get("test_dice") if card.task == "segmenter" else None
    cross = card.metrics.get("cross_archive")
    calibration = card.metrics.get("calibration")
    calibration = calibration if isinstance(calibration, dict) else None
    test = test if isinstance(test, dict) and test else None
    dice = dice if isinstance(dice, dict) else None
    cross = cross if isinstance(cross, dict) else None
    op = card.metrics.get("operating_point")
    op = op if isinstance(op, dict) else None
    text = _MODEL.render(card=card, p=card.preprocessing, name=name, version=version, test=test, dice=dice,
                         cross=cross, op=op, calibration=calibration, headline=_HEADLINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def screen_markdown(classifier: "Component", segmenter: "Component | None") -> str:
    """A screen's card: what it is, then its classifier's card and its segmenter's."""
    p = classifier.card.preprocessing
    role = ("cuts out the lungs the classifier sees" if p.lung_mask else
            "gives the lung-area quality signal only (the classifier sees whole images)")
    head = (f"# cxr screen: {classifier.card.architecture} classifier"
            + (f" + {segmenter.card.architecture} segmenter" if segmenter else "") + "\n\n"
            + "One model: decoded X-ray -> letterbox -> "
            + ("lung mask -> " if p.lung_mask else "") + "classifier -> probabilities, predicted label, "
            + "screen flag at the operating point, Grad-CAM heatmap, lung fraction and quality flags.\n"
            + (f"The segmenter {role}.\n" if segmenter else "No segmenter: no lung-area quality signal.\n"))
    parts = [model_markdown(classifier.card, classifier.name, classifier.version)]
    if segmenter:
        parts.append(model_markdown(segmenter.card, segmenter.name, segmenter.version))
    # Each component card's title one level under the screen's.
    return "\n".join([head] + ["#" + part for part in parts])
