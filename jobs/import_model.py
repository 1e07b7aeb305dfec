"""``cxr import-model``: verify a bundle and register its segmenter, classifier and screen in
this registry (``cxr.workflows.screen.import_model``). Exit 2 if the bundle fails its
checksums, cards or (with ``--require-signature``) signature: nothing is registered; 0 with the
new versions."""

from __future__ import annotations

import sys

from cxr.card import CardError
from cxr.config import ImportModelConfig, load_platform
from cxr.package import PackageError, read_key
from cxr.workflows.screen import import_model


def main(cfg: ImportModelConfig) -> int:
    platform = load_platform()
    try:
        key = read_key(cfg.verify_key) if cfg.verify_key else None
        versions = import_model(platform, cfg.bundle, cfg.alias, key, cfg.require_signature)
    except (PackageError, CardError, OSError) as e:
        print(f"cxr import-model: {cfg.bundle}: {e}", file=sys.stderr)
        return 2
    names = {**platform.registered_models}
    print("import-model: " + ", ".join(f"{names.get(k, k)} v{v}" for k, v in versions.items())
          + (f"; alias {cfg.alias}" if cfg.alias else ""))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["import-model", *sys.argv[1:]]))
