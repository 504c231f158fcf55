"""Shared helpers at the bottom of the import graph.

``validation`` checks hyperparameters and trees, ``dtypes`` names the dtype
each computation runs in, ``moments`` holds the :class:`~optax_snr.Moments`
that moment stages pass on and the arithmetic they share (EMA, bias-correction
factor, casts). Nothing here imports from the rest of the package.
"""
