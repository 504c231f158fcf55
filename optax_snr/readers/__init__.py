"""Readers of an optimizer state: pure, jittable functions that add no buffers.

``lookup`` finds the moments in any state layout; ``diagnostics`` summarizes
signal, noise and SNR; ``noise_scale`` estimates the gradient noise scale;
``plot`` draws logged rows of both.
"""
