"""VGGT (feed-forward multi-view 3D reconstruction), a clean implementation owned by archquant.

Sub-modules: ``camera`` (the 9-D "absT_quaR_FoV" pose encoding and quaternion helpers) and
``preprocess`` (image loading and resizing as VGGT's ``load_and_preprocess_images`` does it).
"""
