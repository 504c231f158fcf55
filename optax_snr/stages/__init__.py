"""The stages: one :class:`optax.GradientTransformation` per part of the SNR reading.

Signal and noise (``ema_moments``, ``centered_moments``), bias
(``bias_correction``, ``mixed_signal``), the noise kept from shrinking
(``max_noise``) and the ratio (``scale_by_snr``, ``scale_by_adopt``). One
module per stage; stages import only from :mod:`optax_snr.common` (and
``mixed_signal`` runs a ``bias_correction`` inside it).
"""
