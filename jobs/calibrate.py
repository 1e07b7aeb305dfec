"""``cxr calibrate``: fit a registered screen's operating point to one site's labelled sample and
register the result for that site (``cxr.workflows.calibrate``)."""

from __future__ import annotations

import sys

from cxr.config import CalibrateConfig, load_platform


def main(cfg: CalibrateConfig) -> int:
    from cxr.workflows.calibrate import CalibrationInputError, calibrate, summary, write_result

    if not cfg.manifest or not cfg.site:
        print("cxr calibrate: --manifest and --site are required", file=sys.stderr)
        return 2
    if not 0 < cfg.specificity < 1:
        print(f"cxr calibrate: --specificity must be in (0, 1), got {cfg.specificity}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    from cxr.package import PackageError

    try:
        result = calibrate(cfg, load_platform())
    except CalibrationInputError as e:
        print(f"cxr calibrate: {e}", file=sys.stderr)
        return 2
    except (MlflowException, PackageError) as e:      # a model that does not resolve or load
        print(f"cxr calibrate: cannot load {cfg.model}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 2
    print(summary(result))
    if cfg.out:
        write_result(result, cfg.out)
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["calibrate", *sys.argv[1:]]))
