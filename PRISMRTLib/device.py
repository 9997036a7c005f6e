"""Compute device choice: CUDA when present, else CPU; overridable ("auto", "cpu", "cuda", "cuda:N", "mps")."""

from __future__ import annotations

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(requested: str = "auto") -> str:
    """The torch device string to run on. Imports torch lazily; without torch only the CPU is possible."""
    requested = (requested or "auto").strip().lower()
    base = requested.split(":", 1)[0]
    if base not in DEVICE_CHOICES or (":" in requested and base != "cuda"):
        raise DeviceError(f"unknown device '{requested}': use auto, cpu, cuda, cuda:N or mps")
    try:
        import torch
    except ImportError:
        if base in ("auto", "cpu"):
            return "cpu"
        raise DeviceError(f"device '{requested}' needs PyTorch, which is not installed: install torch or use --device cpu") from None
    if base == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("no CUDA GPU is available to PyTorch here: use --device cpu (or auto)")
        if ":" in requested:
            index = requested.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise DeviceError(
                    f"there is no GPU '{requested}': this machine has {torch.cuda.device_count()} (cuda:0 ...)"
                )
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("Apple MPS is not available here: use --device cpu (or auto)")
    return requested


def describe_device(device: str) -> str:
    """A one-line description for reports, e.g. "cuda (NVIDIA H100, 80 GB)"."""
    try:
        import torch
    except ImportError:
        return f"{device} (PyTorch not installed)"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"
