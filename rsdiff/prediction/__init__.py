"""Whole-scene prediction: sliding windows, on-the-fly features, blending, COG outputs."""
