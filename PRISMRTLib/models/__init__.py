"""Models: teacher builders (MedSAM, DINOv3, BiomedCLIP), the student with its translators, and bundles.

Importing this package imports torch, timm, open_clip and segment_anything; the imaging core does not.
"""

from .bundle import Bundle, BundleError, build_components, load_bundle, preset_configs, save_bundle

__all__ = ["Bundle", "BundleError", "build_components", "load_bundle", "preset_configs", "save_bundle"]
