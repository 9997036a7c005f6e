"""Intensity handling: CT window presets, MR percentile normalisation, and a CT/MR plausibility check.

Models take float32 slices in [0, 1]. CT is windowed in Hounsfield units (level/width, as on a scanner console);
MR has no absolute scale, so it is clipped at robust percentiles of the foreground and rescaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidImageError


AIR_HU = -980.0  # below this (around a click), CT is air: lung parenchyma, even emphysematous, reads above it


@dataclass(frozen=True)
class Window:
    """A display window in HU: values below ``level - width/2`` map to 0, above ``level + width/2`` to 1."""

    level: float
    width: float

    def __post_init__(self):
        if not (np.isfinite(self.level) and np.isfinite(self.width) and self.width > 0):
            raise InvalidImageError(f"a window needs a finite level and a positive width, got L={self.level} W={self.width}")

    @property
    def lower(self) -> float:
        return self.level - self.width / 2.0

    @property
    def upper(self) -> float:
        return self.level + self.width / 2.0

    def apply(self, values) -> np.ndarray:
        """Window values (any shape) to float32 in [0, 1]."""
        values = np.asarray(values, dtype=np.float32)
        return np.clip((values - np.float32(self.lower)) / np.float32(self.width), 0.0, 1.0)


# Common reading windows (level, width) in HU, as in Radiopaedia's "Windowing (CT)" article.
WINDOW_PRESETS: dict[str, Window] = {
    "soft-tissue": Window(40, 400),
    "lung": Window(-600, 1500),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "head-and-neck": Window(60, 350),
}


def get_window(name: str) -> Window:
    try:
        return WINDOW_PRESETS[name]
    except KeyError:
        raise InvalidImageError(
            f"unknown window preset '{name}': choose one of {', '.join(WINDOW_PRESETS)}"
        ) from None


def normalize_percentiles(values, low: float = 0.5, high: float = 99.5, mask=None) -> np.ndarray:
    """Clip to the [low, high] percentiles (of ``mask``, default: non-zero voxels) and rescale to float32 [0, 1].

    For MR and other images without an absolute intensity scale.
    """
    values = np.asarray(values, dtype=np.float32)
    if mask is None:
        mask = values != 0
    sample = values[mask] if np.any(mask) else values.ravel()
    if sample.size == 0:
        raise InvalidImageError("cannot normalise an empty image")
    lo, hi = np.percentile(sample, [low, high])
    if not hi > lo:
        raise InvalidImageError(
            "the image has no intensity contrast between its "
            f"{low}th and {high}th percentiles ({lo:g}): check that the right image is loaded"
        )
    return np.clip((values - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def ct_likelihood_problems(values) -> list[str]:
    """Reasons why an intensity array does not look like CT in HU (empty list: it does).

    CT in Hounsfield units has air near -1000 HU (outside the body, in airways) and few values above ~3000 HU
    (metal aside). MR, PET, or CT stored without its rescale slope/intercept fail these checks.
    """
    values = np.asarray(values)
    sample = values.ravel()[:: max(1, values.size // 200_000)]  # a fixed stride keeps this fast and deterministic
    problems = []
    lo, p1, p99 = np.percentile(sample, [0, 1, 99])
    if lo > -500:
        problems.append(f"no air: the lowest value is {lo:g}, while CT in HU has air near -1000")
    if p1 > -200 and lo >= 0:
        problems.append("no negative values: this looks like MR, or CT stored without its rescale intercept")
    if p99 > 4000:
        problems.append(f"99th percentile {p99:g} is above the CT range of HU")
    return problems


@dataclass(frozen=True)
class SliceIntensity:
    """How a volume's values become a model's [0, 1] input: a CT window in HU, or for MR and other images without an
    absolute scale, two percentiles of the whole volume's foreground (fixed per volume, so every slice is scaled
    alike; never a CT window)."""

    kind: str  # "window" or "percentiles"
    lower: float
    upper: float
    name: str = ""

    def apply(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float32)
        return np.clip((values - np.float32(self.lower)) / np.float32(self.upper - self.lower), 0.0, 1.0)

    def describe(self) -> str:
        if self.kind == "window":
            level, width = (self.lower + self.upper) / 2, self.upper - self.lower
            return f"CT window {self.name + ' ' if self.name else ''}L{level:g}/W{width:g} HU"
        return f"percentiles 0.5-99.5 of the volume's foreground ({self.lower:.4g} .. {self.upper:.4g})"


def slice_intensity(values, window: "Window | str", is_ct: bool, name: str = "") -> SliceIntensity:
    """The mapping a volume's slices reach the models with: ``window`` for CT, volume percentiles otherwise."""
    if is_ct:
        if isinstance(window, str):
            window, name = get_window(window), window
        return SliceIntensity("window", window.lower, window.upper, name)
    values = np.asarray(values)
    sample = values.ravel()[:: max(1, values.size // 2_000_000)].astype(np.float32)
    foreground = sample[sample > np.percentile(sample, 1)] if np.ptp(sample) > 0 else sample
    lo, hi = np.percentile(foreground if foreground.size else sample, [0.5, 99.5])
    if not hi > lo:
        raise InvalidImageError("the image has no intensity contrast in its foreground: check that the right image "
                                "is loaded")
    return SliceIntensity("percentiles", float(lo), float(hi))
