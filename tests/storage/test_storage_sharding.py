"""Stored moments on a mesh: codes and scales shard with their leaf, results match one device.

Runs ``_storage_sharding_worker.py`` once in a fresh interpreter with 8 CPU
devices (the device count is fixed before JAX starts; see test_sharding.py).
Meshes use ``AxisType.Auto`` (XLA's sharding propagation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_storage_sharding_worker.py")
RUNS = [f"{f}/{k}" for f in ("8bit", "4bit", "sr_bf16") for k in ("1d", "2d")]
PARAM_SPECS = {
    "1d": {"kernel": "P('fsdp',)", "bias": "P('fsdp',)"},
    "2d": {"kernel": "P('data', 'model')", "bias": "P('model',)"},
}


@pytest.fixture(scope="module")
def measured():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device_count"] == 8
    return result["runs"]


@pytest.mark.parametrize("run", RUNS)
def test_the_sharded_run_equals_the_unsharded_one(measured, run):
    assert measured[run]["max_abs_diff"] <= 1e-6


@pytest.mark.parametrize("run", RUNS)
def test_codes_and_values_keep_their_leaf_sharding(measured, run):
    kind = run.split("/")[1]
    specs = measured[run]["specs"]
    assert specs, "no stored arrays found"
    for name, spec in specs.items():
        leaf, field = name.split("/")
        if not field.endswith("scales"):
            assert spec == PARAM_SPECS[kind][leaf], name


@pytest.mark.parametrize("run", [r for r in RUNS if not r.startswith("sr")])
def test_scales_shard_with_the_blocks(measured, run):
    kind = run.split("/")[1]
    specs = measured[run]["specs"]
    for moment in ("mu", "nu"):
        assert specs[f"kernel/{moment}.scales"] == PARAM_SPECS[kind]["kernel"]
    # A 256-entry bias has 4 blocks of 64: they cannot split over 8 devices.
    expected = {"1d": ["bias/mu.scales", "bias/nu.scales"], "2d": []}[kind]
    assert measured[run]["replicated"] == expected
