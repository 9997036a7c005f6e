"""Files of a stand-in training run that the three trainers write alike: atomic writes, JSON, training curves."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_atomic(obj, path: Path, saver) -> None:
    """``saver(obj, tmp)`` then rename over ``path``: an interrupted run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    saver(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    save_atomic(data, path, lambda d, p: p.write_text(json.dumps(d, indent=1)))


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
