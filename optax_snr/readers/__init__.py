"""Readers of an optimizer state: pure, jittable functions that add no buffers."""
