"""Merge the ``results.json`` of label-efficiency runs made on the same draws into one report.

The dense decoder ran as a second job (``methods=[dense_decoder]``, another ``output``) with the
same table, ``ks``, ``draws``, ``seed`` and ``val_budget`` as the first; the job's draws are a
function of those alone, so its runs pair with the first job's draw by draw. This script checks
that they do (the same training and val scenes per (k, draw)), then writes ``table.md``,
``label_efficiency.png`` and ``results.json`` here through the job's own table, paired-difference
and figure code; paths under the working folder are written relative to it.

    python docs/results/label-efficiency-dubai-fair/merge.py runs/e33/le5 runs/e33/le5-dd
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rsdiff.label_efficiency import METHODS, _plot, format_table, paired_entries

HERE = Path(__file__).resolve().parent


def main(outputs: list[Path]) -> None:
    reports = [json.loads((out / "results.json").read_text()) for out in outputs]
    rows = [r for rep in reports for r in rep["runs"]]
    drawn: dict[tuple[int, int], tuple] = {}
    for r in rows:
        scenes = (tuple(r["scenes"]), tuple(r.get("val_scenes") or []))
        if drawn.setdefault((r["k"], r["draw"]), scenes) != scenes:
            raise SystemExit(f"k={r['k']} draw {r['draw']}: the runs did not draw the same scenes")
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    ks = sorted({r["k"] for r in rows})
    unit = reports[0].get("unit", "scenes")
    md = format_table(rows, ks, methods, unit)
    (HERE / "table.md").write_text(md + "\n")
    _plot(rows, ks, methods, unit).savefig(HERE / "label_efficiency.png", dpi=110, bbox_inches="tight")
    merged = {
        **reports[0],
        "runs": rows,
        "paired": paired_entries(rows, methods),
        "table": md,
        "config": [rep["config"] for rep in reports],
        "merged_from": [str(o) for o in outputs],
    }
    text = json.dumps(merged, indent=1).replace(f"{Path.cwd()}/", "")  # paths as the commands gave them
    (HERE / "results.json").write_text(text)
    print(md)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
