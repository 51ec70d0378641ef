"""The PNG plot of one or more benchmark reports (output tokens/s and requests/s against concurrency).

matplotlib is optional: without it the plot is skipped with a message on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def plot(reports: list[dict[str, Any]], png_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(11, 4.2))
    for report in reports:
        by_workload: dict[str, list[dict[str, Any]]] = {}
        for level in report.get("levels", []):
            if not level.get("warmup") and level.get("ok"):
                by_workload.setdefault(level["workload"], []).append(level)
        for workload, levels in sorted(by_workload.items()):
            levels.sort(key=lambda lv: lv["concurrency"])
            cs = [lv["concurrency"] for lv in levels]
            name = f"{report['label']} {workload}"
            ax_tok.plot(cs, [lv["output_tok_s_aggregate"] for lv in levels], marker="o", label=name)
            ax_req.plot(cs, [lv["requests_per_s"] for lv in levels], marker="o", label=name)
    for ax, ylabel in ((ax_tok, "output tokens/s (aggregate)"), (ax_req, "requests/s")):
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_tok.legend(fontsize=7)
    loads = [r.get("load_average_before") for r in reports]
    cpu = reports[0].get("machine", {}).get("cpu_model", "?") if reports else "?"
    fig.suptitle(
        f"vlmserve bench: {cpu}, {reports[0]['machine'].get('cpus_available')} CPUs, load before {loads}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    print(f"wrote {png_path}", flush=True)
