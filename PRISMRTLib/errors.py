"""User-facing errors.

Every error raised for bad input or a bad environment is a :class:`PrismRTError` whose message says
what went wrong and what to do about it. The CLI prints it as one line; the Slicer module shows it in a dialog.
"""


class PrismRTError(Exception):
    """Base class: the message is written for the user."""


class ImageReadError(PrismRTError):
    """A file or folder could not be read as an image."""


class ImageWriteError(PrismRTError):
    """An image could not be written (bad extension, existing file, no permission)."""


class InvalidImageError(PrismRTError):
    """An image was read but cannot be used (2D/4D, empty, constant, NaN, unsupported type)."""


class GeometryError(PrismRTError):
    """A point or plane does not fit the volume (outside it, or not aligned with its axes)."""


class DeviceError(PrismRTError):
    """The requested compute device is not available."""
