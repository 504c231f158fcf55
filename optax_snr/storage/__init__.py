"""Storage formats for the moment buffers: how the signal and the noise are remembered.

A moment stage computes its EMA at full precision; only the buffer it keeps
between steps has a format. A format is a small frozen object (``base``
defines the protocol): ``quantized`` (blockwise 8- or 4-bit codes),
``stochastic_rounding`` (bfloat16, rounded up or down at random so that the
EMA stays unbiased) and ``factored`` (the noise of a matrix as its row and
column means). The moment stages accept one wherever they accept a dtype
(``mu_dtype=``, ``nu_dtype=``) through the helpers in ``base``, so no stage
or optimizer branches on formats.
"""
