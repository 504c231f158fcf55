"""Stored moments serialize with flax.serialization even when Flax is imported after optax_snr."""

import subprocess
import sys

import helpers

SCRIPT = """
import sys
import jax.numpy as jnp
import optax_snr
assert "flax" not in sys.modules  # Importing optax_snr never imports the optional Flax.
import flax.serialization
q8 = optax_snr.quantized(bits=8, min_size=0)
tx = optax_snr.adam(1e-2, mu_dtype=q8)
params = {"w": jnp.ones((4, 8))}
_, state = tx.update(params, tx.init(params))
restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(state))
assert bool(jnp.all(restored[0].mu["w"].codes == state[0].mu["w"].codes))
other = optax_snr.adam(1e-2, mu_dtype=optax_snr.quantized(bits=4, block_size=8, min_size=0))
try:
    flax.serialization.from_bytes(other.init(params), flax.serialization.to_bytes(state))
except ValueError as e:
    assert "bits=8" in str(e) and "bits=4" in str(e), e
else:
    raise AssertionError("a checkpoint of another format was restored")
print("ok")
"""


def test_registration_waits_for_flax():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
