"""snr_diagnostics and noise_scale on states sharded over 8 simulated CPU devices.

The device count must be fixed before JAX starts, so the reading happens in a
fresh interpreter (``_sharded_readers_worker.py``) and this test asserts on
what it printed: for 1-D and 2-D meshes with Explicit axes, eagerly and under
``jax.jit``, and with Auto axes under ``jax.jit``, the readers run (a sort on an Explicit-sharded
array used to raise ``ShardingTypeError``) and give the unsharded numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("_sharded_readers_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_readers_on_sharded_states():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device_count"] == 8
    cases = result["cases"]
    assert len(cases) == 6, sorted(cases)  # 2 meshes x (Explicit eager, jit; Auto jit)
    for label, case in cases.items():
        assert "error" not in case, (label, case["error"])
        assert case["sharded"], label  # the state really was sharded
        assert case["per_leaf"] == ["bias", "big", "kernel", "scale"], label
        # Sums over sharded arrays may be ordered differently; the sampled
        # quantiles draw the same entries.
        assert case["diff"] < 1e-5, (label, case["diff"])
