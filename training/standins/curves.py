"""Training-curve figures of the stand-in runs: the matplotlib set-up and saving they share."""

from __future__ import annotations

import json
from pathlib import Path


def open_curves(log_path: "str | Path", figsize=(10, 3.5)):
    """A two-panel figure for a run's JSON log (``{"log": [entries with "step"]}``): ``(fig, axes, log, steps)``, or
    None when matplotlib is not installed or the log is empty."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = json.loads(Path(log_path).read_text())["log"]
    if not log:
        return None
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    return fig, axes, log, [e["step"] for e in log]


def save_curves(fig, path: "str | Path") -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
