"""``cxr export-model``: a registered screen or classifier as a portable bundle
(``cxr.workflows.screen.export_model``). Exit 2 on a bad option or model, 0 with the bundle's
path and size."""

from __future__ import annotations

import sys

from cxr.config import ExportModelConfig, load_platform
from cxr.package import PackageError, folder_bytes, key_id, read_key
from cxr.weights import DTYPES
from cxr.workflows.screen import export_model


def main(cfg: ExportModelConfig) -> int:
    if cfg.dtype not in DTYPES:
        print(f"cxr export-model: unknown --dtype {cfg.dtype!r}; choices: {list(DTYPES)}", file=sys.stderr)
        return 2
    try:
        key = read_key(cfg.sign_key) if cfg.sign_key else None
        written = export_model(load_platform(), cfg.model, cfg.out, cfg.dtype, cfg.segmenter, cfg.part_mb, key)
    except (PackageError, FileExistsError, ValueError, OSError) as e:
        print(f"cxr export-model: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size if p.is_file() else folder_bytes(p) for p in written)
    where = str(written[0]) if len(written) == 1 else f"{len(written)} parts {written[0]} .. {written[-1].name}"
    signed = f", signed with key {key_id(key)}" if key else ""
    print(f"export-model: {cfg.model} -> {where} ({size / 2**20:.1f} MiB, weights {cfg.dtype}{signed})")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["export-model", *sys.argv[1:]]))
