"""Features of CT slices from either backend, and the per-volume cache the tasks share.

- :mod:`.types`: :class:`SliceFeatures`, the one typed result;
- :mod:`.backends`: ``prismrt`` (the student) and ``teachers`` (one model per role, from the teacher registry);
- :mod:`.resolve`: which models run by default, and :func:`open_backend`;
- :mod:`.cache`: :class:`VolumeFeatures`, features of one volume's slices per orientation, computed once.
"""

from .backends import (BACKENDS, FeatureBackend, MissingTeacherError, StudentBackend, Teacher, TeacherBackend,
                       create_backend, teachers_of)
from .cache import VolumeFeatures
from .resolve import BACKEND_CHOICES, DEFAULT_HELP, DEFAULT_MODELS, default_backend, open_backend
from .types import SliceFeatures

__all__ = [
    "BACKENDS", "BACKEND_CHOICES", "DEFAULT_HELP", "DEFAULT_MODELS", "FeatureBackend", "MissingTeacherError",
    "SliceFeatures", "StudentBackend", "Teacher", "TeacherBackend", "VolumeFeatures", "create_backend",
    "default_backend", "open_backend", "teachers_of",
]
