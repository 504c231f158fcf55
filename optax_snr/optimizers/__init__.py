"""Ready-made optimizers: each one a chain of stages, a drop-in for its Optax twin.

Optimizers import stages and shared helpers, never the other way round.
"""
