"""Fused kernels: the same optimizers computed in one pass by native code (experimental)."""
