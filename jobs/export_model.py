"""``cxr export-model``: a registered screen or classifier as a portable bundle
(``cxr.workflows.screen.export_model``). Exit 2 on a bad option or model, 0 with the bundle's
path and size."""

from __future__ import annotations

import sys

from cxr.config import ExportModelConfig, load_platform
from cxr.package import PackageError, folder_bytes
from cxr.weights import DTYPES
from cxr.workflows.screen import export_model


def main(cfg: ExportModelConfig) -> int:
    if cfg.dtype not in DTYPES:
        print(f"cxr export-model: unknown --dtype {cfg.dtype!r}; choices: {list(DTYPES)}", file=sys.stderr)
        return 2
    try:
        written = export_model(load_platform(), cfg.model, cfg.out, cfg.dtype, cfg.segmenter, cfg.part_mb)
    except (PackageError, FileExistsError, ValueError) as e:
        print(f"cxr export-model: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size if p.is_file() else folder_bytes(p) for p in written)
    where = str(written[0]) if len(written) == 1 else f"{len(written)} parts {written[0]} .. {written[-1].name}"
    print(f"export-model: {cfg.model} -> {where} ({size / 2**20:.1f} MiB, weights {cfg.dtype})")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["export-model", *sys.argv[1:]]))
