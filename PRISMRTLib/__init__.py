"""PRISM-RT library: imaging, models and tasks behind the 3D Slicer module.

Importable without Slicer, Qt or torch; heavy dependencies are imported where they are used.
"""

__version__ = "0.1.0"
