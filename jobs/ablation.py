"""``cxr ablation``: repeated ``cxr finetune`` runs over variants and seeds, summarised as the
Markdown tables that docs/RESULTS.md quotes (mean +- std over seeds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cxr.ablation import VARIANTS, check_variants, per_class_table, table, within_table
from cxr.config import AblationConfig, FinetuneConfig, load_config


def main(cfg: AblationConfig) -> int:
    from jobs import finetune

    try:
        check_variants(cfg.variants)
    except ValueError as e:
        print(f"cxr ablation: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["variant"], r["seed"]) for r in results}
    for variant in cfg.variants:
        task, classes, pretrained, masked = VARIANTS[variant]
        for seed in cfg.seeds:
            if (variant, seed) in done:      # resumable: a rerun only runs what is missing
                continue
            overrides = {"manifest": str(Path(cfg.manifests) / "tasks" / f"{task}.parquet"), "classes": classes,
                         "seed": seed, "pretrain_run": cfg.pretrain_run if pretrained else None,
                         "register": False, "run_name": f"ablation-{variant}-s{seed}"}
            if not masked:
                overrides["segmenter"] = "none"
            r = finetune.run(load_config(FinetuneConfig, cfg.finetune_config, overrides))
            results.append({"variant": variant, "seed": seed, "run_id": r["run_id"], "minutes": r["minutes"],
                            "report": r["report"]})
            results_file.write_text(json.dumps(results, indent=2))
    text = "\n\n".join(part for part in [table(results), within_table(results), *(
        per_class_table(results, v) for v in ("paper-4class", "paper-3class") if v in cfg.variants)] if part)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli_main

    sys.exit(cli_main(["ablation", *sys.argv[1:]]))
