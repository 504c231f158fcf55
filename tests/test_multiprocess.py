"""Two processes, four devices: ``jax.distributed`` training equals one process.

The test starts two copies of ``_multiprocess_worker.py``; they join through
``jax.distributed.initialize`` on ``127.0.0.1`` (a free port, CPU collectives
over gloo), each with two simulated CPU devices, shard params and the optimizer
state over the four global devices and train for a few steps. The gathered
params and moments must equal a single-process run of the same code.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import _multiprocess_worker as worker
import helpers
import jax
import numpy as np

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 100


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(out_file: Path) -> list[str]:
    """Runs both workers to completion (or kills them); returns their outputs."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out_file)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"worker {i} failed (rc={p.returncode}):\n{out[-4000:]}"
    return outputs


def test_two_process_training_equals_single_process(tmp_path):
    out_file = tmp_path / "result.npz"
    _run_two_processes(out_file)
    result = dict(np.load(out_file))

    host_params, x, y = worker.make_problem()
    params, state = worker.train(host_params, x, y)
    expected = {
        "params": params,
        "mu": state[0].mu,
        "nu": state[0].nu,
        "count": state[0].count,
    }
    expected = {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    assert result.keys() == expected.keys()
    assert int(result["['count']"]) == worker.NUM_STEPS
    # Every op is elementwise or a reduction over the replicated batch, which
    # XLA may order differently once the arrays are sharded: float32 tolerance.
    diff = helpers.tree_max_abs_diff(result, expected)
    assert diff <= 1e-6, f"max |multi-process - single-process| = {diff}"
