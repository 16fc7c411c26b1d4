"""The pretraining-compute curve as a figure: test mIoU of a head on frozen DDPM features against
the images a checkpoint saw in pretraining, one line per label budget k, beside the scratch UNet's
band for the same k (it does not depend on the checkpoint).

The x axis ticks exactly at the measured checkpoints (images seen, with their step), the legend
names the methods in words and the title states how many draws each point averages.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def compute_curve_figure(curve: dict[str, Any]) -> Any:
    """A matplotlib figure of ``curve`` (the ``curve.json`` of ``tests/benchmarks/bench_pretrain_curve.py``).

    ``curve`` holds ``points`` (``step``, ``images_seen``, ``residual`` = {k: [mean, std]} of test
    mIoU in [0, 1]), ``scratch_unet`` ({k: [mean, std]}), ``ks``, ``draws`` and optionally ``unit``
    (what k counts: ``scenes`` when absent).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rsdiff.method_names import METHOD_NAMES

    points = sorted(curve["points"], key=lambda p: p["images_seen"])
    unit, draws = curve.get("unit", "scenes"), int(curve["draws"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [p["images_seen"] for p in points]
    for i, k in enumerate(curve["ks"]):
        colour, budget = f"C{i}", f"k={k} " + (unit.removesuffix("s") if k == 1 else unit)
        mean = np.array([p["residual"][str(k)][0] for p in points])
        std = np.array([p["residual"][str(k)][1] for p in points])
        ax.plot(x, mean, marker="o", color=colour, label=f"{METHOD_NAMES['residual']}, {budget}")
        ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15)
        m, s = curve["scratch_unet"][str(k)]
        ax.axhspan(m - s, m + s, color=colour, alpha=0.08)
        ax.axhline(m, color=colour, ls="--", lw=1, label=f"{METHOD_NAMES['scratch_unet']}, {budget}")
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{n:,}\nstep {p['step']:,}" for n, p in zip(x, points)])
    ax.minorticks_off()
    ax.set_xlabel("images seen in pretraining (checkpoint step)")
    n = f"{draws} draw" + ("s" if draws != 1 else "")
    ax.set_ylabel(f"test mIoU (mean ± std over {n})")
    ax.set_title(f"Test mIoU against pretraining compute ({n} per point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
