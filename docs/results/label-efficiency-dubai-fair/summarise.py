"""Rebuild the label-efficiency report from the finished runs of a stopped ``jobs/label_efficiency.py``.

A run of the job writes ``results.json`` only when every (k, draw, method) is done; a run stopped
earlier leaves, per finished run, its head (``heads/<method>-k<k>-d<draw>/head.json``: val mIoU)
and its scored test maps (``predictions/<method>-k<k>-d<draw>/metrics.json``). This script reads
those, keeps the (k, draw) pairs every method finished, redraws their scenes with the job's own
seeded draws, and writes ``table.md``, ``label_efficiency.png`` and ``partial-results.json`` here
through the job's own table, paired-difference and figure code.

    python docs/results/label-efficiency-dubai-fair/summarise.py runs/fair/le runs/fair/features
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rsdiff.draws import draw_units
from rsdiff.features.table import FeatureTable
from rsdiff.label_efficiency import _plot, _table_images, format_table, paired_entries, scene_of

HERE = Path(__file__).resolve().parent


def main(out: Path, features: str, methods: list[str], seed: int = 0) -> None:
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    table = FeatureTable.open(features)
    pool = sorted({scene_of(t) for t in _table_images(table, "train")})
    val_pool = sorted({scene_of(t) for t in _table_images(table, "val")})
    rows = []
    for metrics in sorted(out.glob("predictions/*/metrics.json")):
        method, k, d = metrics.parent.name.rsplit("-", 2)
        k, d = int(k[1:]), int(d[1:])
        head = json.loads((out / "heads" / metrics.parent.name / "head.json").read_text())
        m = json.loads(metrics.read_text())
        scenes, val = draw_units(pool, k, d, seed), draw_units(val_pool, k, d, seed + 1)
        rows.append({
            "method": method, "k": k, "draw": d, "scenes": scenes, "val_scenes": val,
            "train_scenes": k, "selection_scenes": k, "recipe_scenes": 0, "labeled_scenes_used": 2 * k,
            "test_miou": m["miou"], "test_iou": m["iou"], "test_overall_accuracy": m["overall_accuracy"],
            "val_miou": head["metrics"].get("val_miou"), "best_step": head["metrics"].get("best_step"),
        })  # fmt: skip
    done = {(r["k"], r["draw"]) for r in rows}
    done = {kd for kd in done if all(any((r["k"], r["draw"]) == kd and r["method"] == m for r in rows)
                                    for m in methods)}  # fmt: skip
    rows = sorted((r for r in rows if (r["k"], r["draw"]) in done), key=lambda r: (r["draw"], r["k"]))
    ks = sorted({r["k"] for r in rows})
    md = format_table(rows, ks, methods, "scenes")
    (HERE / "table.md").write_text(md + "\n")
    _plot(rows, ks, methods, "scenes").savefig(HERE / "label_efficiency.png", dpi=110, bbox_inches="tight")
    summary = {"finished": sorted(done), "runs": rows, "paired": paired_entries(rows, methods), "config": cfg}
    (HERE / "partial-results.json").write_text(json.dumps(summary, indent=1))
    print(md)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], ["finetune", "finetune_random", "scratch_unet"])
