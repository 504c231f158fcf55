"""Stored moments on a mesh: codes and scales shard with their leaf, results match one device.

Runs ``_storage_sharding_worker.py`` once in a fresh interpreter with 8 CPU
devices (the device count is fixed before JAX starts; see test_sharding.py).
Each format runs on an FSDP (1-D) and a data x model (2-D) mesh, with
``AxisType.Auto`` axes (XLA's sharding propagation) and with
``AxisType.Explicit`` axes (sharded types, under ``jax.set_mesh``).
"""

from __future__ import annotations

from pathlib import Path

import helpers
import pytest
from jax.sharding import PartitionSpec as P

WORKER = Path(__file__).with_name("_storage_sharding_worker.py")
FORMATS = ("8bit", "4bit", "sr_bf16", "factored")
RUNS = [f"{f}/{k}/{a}" for f in FORMATS for k in ("1d", "2d") for a in ("auto", "explicit")]
EXPLICIT = [r for r in RUNS if r.endswith("explicit")]
QUANTIZED = [r for r in RUNS if r.split("/")[0] in ("8bit", "4bit")]
# Each leaf's partition spec, one entry per axis (the worker's SPECS).
LEAF_SPECS = {
    "1d": {"kernel": ("fsdp", None), "bias": ("fsdp",), "wide": (None, "fsdp")},
    "2d": {"kernel": ("data", "model"), "bias": ("model",), "wide": (None, ("data", "model"))},
}


def spec(entries) -> str:
    """As the worker writes a spec: trailing unsharded axes dropped."""
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return str(P(*entries))


@pytest.fixture(scope="module")
def worker():
    return helpers.run_eight_device_worker(WORKER)


@pytest.fixture(scope="module")
def measured(worker):
    return worker["runs"]


@pytest.mark.parametrize("run", RUNS)
def test_the_sharded_run_equals_the_unsharded_one(measured, run):
    assert measured[run]["max_abs_diff"] <= 1e-6


@pytest.mark.parametrize("run", EXPLICIT)
def test_explicit_meshes_keep_every_type(measured, run):
    # The state's sharded types after init equal those after the steps (no retrace).
    assert measured[run]["type_changes"] == []


@pytest.mark.parametrize("run", [r for r in EXPLICIT if "/1d/" in r])
def test_explicit_meshes_work_eagerly(measured, run):
    assert measured[run]["eager_max_abs_diff"] <= 1e-6
    # Eager and jitted init, and the eager step, give the same sharded types.
    assert measured[run]["eager_type_changes"] == []


@pytest.mark.parametrize("run", RUNS)
def test_codes_and_values_keep_their_leaf_sharding(measured, run):
    name, kind, _ = run.split("/")
    specs = measured[run]["specs"]
    assert specs, "no stored arrays found"
    for key, got in specs.items():
        leaf, field = key.split("/")
        entries = LEAF_SPECS[kind][leaf]
        if field.endswith(("codes", "value")):
            assert got == spec(entries), key
        elif field.endswith("row"):  # the mean over the last axis
            assert got == spec(entries[:-1]), key
        elif field.endswith("col"):  # the mean over the second-to-last
            assert got == spec(entries[:-2] + entries[-1:]), key
    # Leaves a format leaves dense keep their param's sharding too.
    for key, got in measured[run]["dense_specs"].items():
        assert got == spec(LEAF_SPECS[kind][key.split("/")[1]]), key
    if name == "factored":  # the 2-D leaves are factored, the bias and the signal not
        assert sorted(specs) == ["kernel/nu.col", "kernel/nu.row", "wide/nu.col", "wide/nu.row"]
        assert sorted(measured[run]["dense_specs"]) == [
            "mu/bias",
            "mu/kernel",
            "mu/wide",
            "nu/bias",
        ]


@pytest.mark.parametrize("run", QUANTIZED)
def test_scales_shard_with_the_blocks(measured, run):
    kind = run.split("/")[1]
    specs = measured[run]["specs"]
    for moment in ("mu", "nu"):
        for leaf in ("kernel", "wide"):
            assert specs[f"{leaf}/{moment}.scales"] == spec(LEAF_SPECS[kind][leaf])
        # A 256-entry bias has 4 blocks of 64: they cannot split over 8 devices.
        expected = "P()" if kind == "1d" else spec(LEAF_SPECS[kind]["bias"])
        assert specs[f"bias/{moment}.scales"] == expected


ENCODES = [
    f"{case}/{bits}/{moment}/{mode}"
    for case in ("8x120", "8x104")
    for bits in (8, 4)
    for moment in ("signed", "positive")
    for mode in (("eager", "jit") if case == "8x120" else ("jit",))
]


@pytest.mark.parametrize("key", ENCODES)
def test_blocks_that_straddle_shards_encode_as_on_one_device(worker, key):
    bits = key.split("/")[1]
    got = worker["encode"][key]
    assert got["equal"]
    # Shards of 15 or 13 entries cannot hold whole bytes of 4-bit codes: the
    # last axis is gathered, and the codes stay replicated along it.
    codes = "P()" if bits == "4" else "P(None, 'fsdp')"
    assert (got["codes"], got["decoded"]) == (codes, codes)
    assert got["scales"] == "P()"  # 2 or 3 blocks cannot split over 8 devices
