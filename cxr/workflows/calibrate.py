"""``cxr calibrate``: a registered screen's operating point fitted to one site's labelled sample,
registered as new classifier and screen versions (``calibrate``). The figures come from
``cxr.crossval``'s calibration functions, as in the leave-one-archive-out runs."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cxr import tracking
from cxr.card import OperatingPoint, _finite
from cxr.classification import inference_device, predict
from cxr.config import CalibrateConfig, PlatformConfig
from cxr.operating_point import (calibrated, fit_temperature_binary, local_negatives_curve, local_threshold,
                                 log_probabilities, temperature_at_bound)
from cxr.data.manifest import add_sha256, csv_manifest, manifest_digest, read_manifest
from cxr.metrics import screening_metrics
from cxr.model_input import Preprocess
from cxr.workflows.screen import components, register_screen

log = logging.getLogger(__name__)

MIN_NEGATIVES = 10           # fewer cannot place a threshold at any useful specificity
MIN_FOR_TEMPERATURE = 5      # COVID and other images a sample needs before a temperature is fitted to it
CURVE_SIZES = (10, 20, 30, 50, 75, 100, 150, 200, 300, 500)


class CalibrationInputError(ValueError):
    """The sample cannot calibrate anything (missing labels, too few negatives, no COVID class)."""


def is_covid_label(label: str) -> bool:
    """A site's label means COVID-19: "covid", "COVID-19", " Covid19 " (any case and spacing)."""
    return str(label).strip().lower().replace("-", "").replace("_", "").replace(" ", "").startswith("covid")


def labelled_rows(uri: str, platform: PlatformConfig) -> pd.DataFrame:
    """A CSV (path,label,patient_id) or Parquet manifest's labelled rows, with ``is_covid``,
    each image once (by content: the same bytes twice would count twice). A file that cannot
    be read is a ``CalibrationInputError`` naming it: a sample is small, and every image counts."""
    try:
        rows = read_manifest(uri, platform.storage) if uri.endswith(".parquet") else csv_manifest(uri, platform.storage)
    except (OSError, ValueError) as e:            # BadImageError (missing file) is a ValueError
        raise CalibrationInputError(f"{uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    rows = rows[rows["label"].notna() & (rows["label"].astype(str).str.strip() != "")].reset_index(drop=True)
    if "sha256" not in rows or rows["sha256"].isna().any():
        rows = add_sha256(rows.drop(columns="sha256", errors="ignore"), platform.storage)
    unreadable = rows.loc[rows["sha256"].isna(), "uri"].tolist()
    if unreadable:
        raise CalibrationInputError(f"{uri}: {len(unreadable)} file(s) cannot be read, e.g. {unreadable[0]}")
    rows = rows.drop_duplicates("sha256").reset_index(drop=True)
    return rows.assign(is_covid=[is_covid_label(label) for label in rows["label"]])


def site_sample(cfg: CalibrateConfig, platform: PlatformConfig) -> pd.DataFrame:
    """The sample's rows with ``is_covid``; a row without a label is left out."""
    rows = labelled_rows(cfg.manifest, platform)
    if (~rows["is_covid"]).sum() < MIN_NEGATIVES:
        raise CalibrationInputError(f"{cfg.manifest}: {int((~rows['is_covid']).sum())} labelled non-COVID "
                                    f"images; a threshold needs at least {MIN_NEGATIVES}")
    return rows


def covid_log_probs(model, preprocess: Preprocess, uris: list[str], platform: PlatformConfig,
                    threads: int) -> np.ndarray:
    try:
        images, _ = preprocess.prepare(uris, platform.storage, threads)
    except ValueError as e:                      # BadImageError: a file that does not decode
        raise CalibrationInputError(f"an image of the sample cannot be used: {str(e).splitlines()[0]}") from e
    return log_probabilities(predict(model, images)[0])


def needed_negatives(curve: list[dict], specificity: float, slack: float = 0.05) -> int | None:
    """The fewest local negatives whose threshold keeps specificity >= ``specificity - slack``
    in 95% of draws (None if no sample size tried does)."""
    return next((c["n"] for c in curve if c["specificity_p05"] >= specificity - slack), None)


def calibrate(cfg: CalibrateConfig, platform: PlatformConfig) -> dict:
    """Score the sample, fit, register; returns the figures and the new versions."""
    uri = platform.tracking_uri
    rows = site_sample(cfg, platform)
    classifier, segmenter = components(uri, cfg.model)
    labels = list(classifier.card.labels)
    if "covid" not in labels:
        raise CalibrationInputError(f"{cfg.model} has no covid class to screen for")
    covid = labels.index("covid")
    prep = classifier.card.preprocessing
    preprocess = Preprocess(prep, segmenter if prep.lung_mask else None)
    model = classifier.model.to(inference_device())
    log_probs = covid_log_probs(model, preprocess, rows["uri"].tolist(), platform, cfg.load_threads)
    positive = rows["is_covid"].to_numpy(bool)

    before_op = classifier.card.operating_point
    before_t = before_op.temperature if before_op else 1.0
    before = None
    if before_op is not None:
        before = screening_metrics(positive, calibrated(log_probs, before_t)[:, covid], before_op.threshold,
                                   cfg.n_boot)
    fit_t = positive.sum() >= MIN_FOR_TEMPERATURE and (~positive).sum() >= MIN_FOR_TEMPERATURE
    temperature = fit_temperature_binary(log_probs, covid, positive) if fit_t else before_t
    if fit_t and temperature_at_bound(temperature):
        # At a bound, the sample separates (or anti-separates) perfectly: the fit says nothing.
        log.warning("the temperature fit reached its bound (%.3f); keeping the model's %.3f", temperature, before_t)
        fit_t, temperature = False, before_t
    score = calibrated(log_probs, temperature)[:, covid]
    threshold = local_threshold(score[~positive], cfg.specificity)
    after = screening_metrics(positive, score, threshold, cfg.n_boot)
    curve = local_negatives_curve(score[~positive], CURVE_SIZES, cfg.specificity,
                                  positives=score[positive] if positive.any() else None)
    digest = manifest_digest(rows.assign(label=np.where(positive, "covid", "other"), split=None))
    result = {
        "site": cfg.site, "model": cfg.model, "sample": cfg.manifest, "sample_sha256": digest,
        "n_covid": int(positive.sum()), "n_other": int((~positive).sum()),
        "before": {"threshold": before_op.threshold if before_op else None, "temperature": before_t,
                   **({k: before[k] for k in ("sensitivity", "specificity")} if before else {})},
        "after": {"threshold": threshold, "temperature": temperature,
                  "temperature_fitted": bool(fit_t), **{k: after[k] for k in ("sensitivity", "specificity")}},
        "specificity_wanted": cfg.specificity, "curve": curve,
        "needed_negatives": needed_negatives(curve, cfg.specificity),
    }
    if cfg.check:
        check = labelled_rows(cfg.check, platform)
        if set(check["sha256"].dropna()) & set(rows["sha256"].dropna()):
            raise CalibrationInputError(f"{cfg.check} shares images with {cfg.manifest}: a check must be kept apart")
        check_lp = covid_log_probs(model, preprocess, check["uri"].tolist(), platform, cfg.load_threads)
        check_pos = check["is_covid"].to_numpy(bool)
        result["check"] = {"sample": cfg.check, "n_covid": int(check_pos.sum()), "n_other": int((~check_pos).sum()),
                           "after": screening_metrics(check_pos, calibrated(check_lp, temperature)[:, covid],
                                                      threshold, cfg.n_boot)}
        if before_op is not None:
            result["check"]["before"] = screening_metrics(check_pos, calibrated(check_lp, before_t)[:, covid],
                                                          before_op.threshold, cfg.n_boot)
    # The test figures at the old operating point no longer describe this card's: dropped, and
    # the site's figures take their place.
    test = {k: v for k, v in (classifier.card.metrics.get("test") or {}).items() if k != "screening"}
    card = dataclasses.replace(
        classifier.card,
        operating_point=OperatingPoint(threshold, cfg.specificity, f"site {cfg.site}: {result['n_other']} local "
                                       f"negatives, sample {digest[:12]}", "covid", temperature),
        metrics={**classifier.card.metrics, "test": test,
                 "calibration": _finite({k: v for k, v in result.items() if k != "curve"})})
    name = platform.registered_models["classifier"]
    with tracking.tracked_run(uri, platform.experiments.get("screen", "cxr-screen"), f"calibrate-{cfg.site}",
                              tags={"cxr.job": "calibrate", "cxr.site": cfg.site, "cxr.source": cfg.model},
                              artifact_location=platform.artifact_location) as run_id:
        tracking.log_dict(uri, run_id, _finite(result), "calibration.json")
        tracking.log_metrics(uri, run_id, {"threshold": threshold, "temperature": temperature,
                                           "sample_specificity": after["specificity"]["value"]})
        # A new temperature and threshold move these two measures; the films' own stay valid.
        reference = classifier.reference.without("covid_probability", "screen_positive") if classifier.reference else None
        version = tracking.register_model(uri, name, run_id, classifier.model, card, qc=classifier.qc,
                                          reference=reference)
    seg_uri = f"models:/{segmenter.name}/{segmenter.version}" if segmenter and segmenter.version else None
    result["classifier"] = f"models:/{name}/{version}"
    result["screen"] = f"models:/{platform.registered_models.get('screen', 'cxr-screen')}/" + register_screen(
        platform, result["classifier"], seg_uri, cfg.alias)
    return result


def summary(result: dict) -> str:
    """What a person reads: before and after, and how many local images were needed."""
    def rate(part: dict, name: str) -> str:
        m = part.get(name)
        return "-" if not m or not math.isfinite(m["value"]) else f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"

    out = io.StringIO()
    b, a = result["before"], result["after"]
    print(f"site {result['site']}: {result['n_covid']} COVID and {result['n_other']} other images "
          f"(sample {result['sample_sha256'][:12]})", file=out)
    if b["threshold"] is not None:
        print(f"before: threshold {b['threshold']:.4f} (T {b['temperature']:.3f})  sensitivity {rate(b, 'sensitivity')}"
              f"  specificity {rate(b, 'specificity')}", file=out)
    print(f"after:  threshold {a['threshold']:.4f} (T {a['temperature']:.3f}"
          f"{'' if a['temperature_fitted'] else ', kept'})  sensitivity {rate(a, 'sensitivity')}"
          f"  specificity {rate(a, 'specificity')} (on the sample it was fitted to)", file=out)
    for c in result["curve"]:
        print(f"  {c['n']:4d} local negatives: specificity on the others {c['specificity_mean']:.3f} "
              f"(5th percentile {c['specificity_p05']:.3f})", file=out)
    if "check" in result:
        c = result["check"]
        print(f"kept-apart check ({c['n_covid']} COVID, {c['n_other']} other):", file=out)
        for when in ("before", "after"):
            if when in c:
                print(f"  {when}: sensitivity {rate(c[when], 'sensitivity')}  "
                      f"specificity {rate(c[when], 'specificity')}", file=out)
    needed = result["needed_negatives"]
    print(f"local negatives needed for specificity >= {result['specificity_wanted'] - 0.05:.2f} in 95% of draws: "
          f"{needed if needed is not None else 'more than this sample holds'}", file=out)
    print(f"registered {result['classifier']} and {result['screen']}", file=out)
    return out.getvalue().rstrip()


def write_result(result: dict, path: str) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite(result), indent=2, allow_nan=False))
