"""Deformable image registration with the quality assurance a physicist signs off on.

Conventions (every module here): images are SimpleITK images in LPS millimetres. A registration's result is a
*displacement field* on the fixed image's grid: a 3-component ``sitkVectorFloat64`` image with the fixed image's
size, spacing, origin and direction, whose value at a fixed point ``p`` (LPS, mm) is ``u(p)`` with
``p_moving = p + u(p)`` (ITK's DisplacementFieldTransform convention). The warped moving image is the moving image
sampled at ``p + u(p)`` for every fixed voxel ``p``.
"""
