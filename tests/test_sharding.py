"""Sharded params and state on 8 simulated CPU devices.

The device count must be fixed before JAX starts, and ``conftest.py`` has
started it in this process, so the checks run once in a fresh interpreter
(``_sharding_worker.py``); this module asserts on what it measured. Covered:
FSDP (1-D) and data x model (2-D) meshes, explicit sharding under ``jax.jit``
(also with storage formats given to the optimizers; the formats' own layouts
are checked in ``storage/test_storage_sharding.py``), a donated train step
against an unsharded run, and ``shard_map`` data parallelism with
``jax.lax.pmean`` against a single device.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import helpers
import pytest

WORKER = Path(__file__).with_name("_sharding_worker.py")
TOLERANCE = 1e-6  # float32: sharded reductions may be ordered differently.


def run_worker(*args: str, timeout: float = 240) -> dict:
    """Runs ``_sharding_worker.py`` with 8 CPU devices; returns its JSON result."""
    return helpers.run_eight_device_worker(WORKER, *args, timeout=timeout)


@pytest.fixture(scope="session")
def measured(request, tmp_path_factory):
    """The worker's measurements, taken once per test session.

    Under pytest-xdist each worker process has its own session: the first to
    take the lock runs the 8-device worker, the others read its result.
    """
    if getattr(request.config, "workerinput", None) is None:
        return run_worker("sharding")
    shared = tmp_path_factory.getbasetemp().parent
    result_file = shared / "sharding_worker.json"
    try:
        os.close(os.open(shared / "sharding_worker.lock", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        deadline = time.monotonic() + 300
        while not result_file.exists():
            assert time.monotonic() < deadline, "timed out waiting for the sharding worker"
            time.sleep(0.2)
        result = json.loads(result_file.read_text())
        assert "error" not in result, result.get("error")
        return result
    try:
        result = run_worker("sharding")
    except BaseException as e:
        result = {"error": f"the sharding worker failed in another process: {e}"}
        raise
    finally:
        partial = shared / "sharding_worker.json.partial"
        partial.write_text(json.dumps(result))
        partial.rename(result_file)
    return result


def test_init_gives_moments_the_params_shardings(measured):
    assert measured["init_mismatches"] == []


def test_explicit_sharding_jit_init_and_update_keep_sharded_types(measured):
    assert measured["explicit_mismatches"] == []
    # 2 meshes x (4 mu + 4 nu + count + 4 updates) leaves were compared.
    assert measured["explicit_leaves_checked"] == 26
    assert measured["spec"] == "float32[16@data,8@model]"


def test_storage_formats_through_optimizer_arguments_on_an_explicit_mesh(measured):
    # amsgrad (8-bit mu, 4-bit nu and nu_max), adabelief (4-bit mu, factored nu),
    # adopt (stochastically rounded mu, 8-bit nu): jitted init and 5 jitted steps.
    assert measured["explicit_formats_mismatches"] == []
    assert measured["explicit_formats_leaves_checked"] == 51
    for name, diff in measured["explicit_formats_diffs"].items():
        assert diff <= TOLERANCE, name


def test_donated_train_step_keeps_shardings(measured):
    assert measured["donated_mismatches"] == []
    assert measured["donated_count_replicated"]
    assert measured["donated_inputs_deleted"]


def test_sharded_run_equals_unsharded_run(measured):
    assert measured["donated_count"] == 20
    assert measured["donated_params_diff"] <= TOLERANCE
    assert measured["donated_state_diff"] <= TOLERANCE


def test_shard_map_pmean_data_parallel_equals_single_device(measured):
    assert measured["dp_count"] == 20
    assert measured["dp_params_diff"] <= TOLERANCE
    # The moments catch a gradient off by a constant factor (Adam's params
    # would not: the ratio cancels it).
    assert measured["dp_state_diff"] <= TOLERANCE
