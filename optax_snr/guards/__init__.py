"""Guards: wrappers that protect a training run from bad steps."""
