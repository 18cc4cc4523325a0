"""LTS reports written into a run folder: ``lts.json`` (per-layer frozen fractions, per-epoch history, run totals)
and ``lts.png`` (frozen fraction per layer, and the frozen fraction over epochs)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from evcli.io.checkpoint import atomic_write_text


def write_lts_report(
    run_dir: str | Path, rows: list[dict[str, Any]], history: list[dict[str, Any]], totals: dict[str, Any], title: str
) -> dict[str, str]:
    """Write ``lts.json`` and ``lts.png`` into ``run_dir``; returns their paths by label."""
    run_dir = Path(run_dir)
    doc = {"title": title, "totals": totals, "layers": rows, "history": history}
    json_path = atomic_write_text(run_dir / "lts.json", json.dumps(doc, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lts_rows = [r for r in rows if r["lts"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.2 * len(lts_rows) + 1.4)))
    ax1.barh(range(len(lts_rows)), [100 * r["frozen"] for r in lts_rows], color="#4C72B0")
    ax1.set_yticks(range(len(lts_rows)), [r["layer"] for r in lts_rows], fontsize=7)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("weights frozen at the end (%)")
    ax1.set_title(f"{title}: LTS frozen weights per layer", fontsize=9)
    if history:
        ep = [h["step"] for h in history]
        ax2.plot(ep, [100 * h["frozen_end"] for h in history], "o-", label="frozen at epoch end")
        ax2.plot(ep, [100 * h["updates_eliminated"] for h in history], "s-", label="updates eliminated (epoch)")
        ax2.plot(
            ep, [100 * h["backward_flops_saved_counted"] for h in history], "^-", label="backward FLOPs saved (counted)"
        )
        ax2.set_xlabel("step (end of each epoch)")
        ax2.set_ylim(0, 100)
        ax2.legend(fontsize=7)
    ax2.set_title(
        f"run: {100 * totals['updates_eliminated']:.1f}% updates eliminated, "
        f"{100 * totals['backward_flops_saved_counted']:.1f}% backward FLOPs (counted)",
        fontsize=9,
    )
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".lts.", suffix=".png", dir=run_dir)
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "lts.png")
    return {"lts_chart": str(run_dir / "lts.png"), "lts_table": str(json_path)}
