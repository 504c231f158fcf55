"""Smoke test of benchmarks/step.py: it runs and its JSON has every field.

No timing is asserted here (the machine is shared and timings are noise in a
test). What is checked is what the benchmark reports besides time: that each
step compiled once over its run, that optax_snr.adam ended bit-identical to
optax.adam, and that the HLO statistics are present and sensible.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from optax_snr.kernels import fused_adam as fused_module

ROOT = pathlib.Path(__file__).resolve().parents[1]

OPTAX, SNR, FUSED = "optax.adam", "optax_snr.adam", "optax_snr.fused_adam"
OPTIMIZER_FIELDS = {
    "median_ms",
    "ratio_to_optax_median",
    "ratio_to_optax_iqr",
    "loop_median_ms_per_step",
    "loop_ratio_to_optax_median",
    "loop_ratio_to_optax_iqr",
    "compile_s",
    "fusions",
    "array_fusions",
    "custom_calls",
    "copies",
    "state_bytes",
    "bytes_per_param",
    "temp_bytes",
    "max_abs_diff_to_optax",
    "retraces_after_first",
    "traces_total",
}


def run_benchmark(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``benchmarks/<script>`` on the default single CPU device; returns the process."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    proc = run_benchmark("step.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_has_every_shape_and_field(quick_results):
    results, _ = quick_results
    assert set(results) >= {"command", "args", "machine", "shapes", "table"}
    assert set(results["shapes"]) == {"leaf", "tree", "mlp"}
    assert {"cpu", "cores", "jax", "optax", "xla_flags"} <= set(results["machine"])
    for shape in results["shapes"].values():
        assert shape["num_params"] > 0
        assert set(shape["optimizers"]) == {OPTAX, SNR, FUSED}
        for entry in shape["optimizers"].values():
            assert OPTIMIZER_FIELDS <= set(entry)
            assert entry["median_ms"] > 0 and math.isfinite(entry["median_ms"])
            assert entry["loop_median_ms_per_step"] > 0
            assert entry["fusions"] >= entry["array_fusions"]
            assert entry["array_fusions"] + entry["custom_calls"] >= 1
            assert entry["bytes_per_param"] >= 28.0  # No step can move less.
        # The chain compiles to optax.adam's loops; the fused step to one kernel.
        optax_entry, snr, fused = (shape["optimizers"][k] for k in (OPTAX, SNR, FUSED))
        assert snr["array_fusions"] == optax_entry["array_fusions"] >= 3 * shape["num_leaves"]
        assert snr["bytes_per_param"] == optax_entry["bytes_per_param"]
        calls = -(-shape["num_leaves"] // fused_module._LEAVES_PER_CALL)  # Leaves in groups.
        assert (fused["custom_calls"], fused["array_fusions"]) == (calls, 0)
        assert 28.0 <= fused["bytes_per_param"] < 28.1
        # Every step, fused_adam's documented jit(opt.step, donate_argnums=(0, 1))
        # included, updates its donated buffers in place: no array is copied.
        assert [e["copies"] for e in (optax_entry, snr, fused)] == [0, 0, 0]
        assert set(shape["references"]) == {"dispatch", "stream", "adam_traffic", "bandwidth_bound"}
        assert shape["references"]["bandwidth_bound"]["bandwidth_GBps"] > 0


def test_shape_b_is_transformer_like(quick_results):
    results, _ = quick_results
    assert results["shapes"]["tree"]["num_leaves"] == 244
    assert results["shapes"]["leaf"]["num_leaves"] == 1


def test_no_recompilation_and_bit_exact(quick_results):
    results, _ = quick_results
    for shape in results["shapes"].values():
        for entry in shape["optimizers"].values():
            assert entry["retraces_after_first"] == 0
            assert entry["traces_total"] == 1
        # Every optimizer took the same steps from the same start.
        assert shape["optimizers"][SNR]["max_abs_diff_to_optax"] == 0.0
        assert shape["optimizers"][FUSED]["max_abs_diff_to_optax"] <= 1e-6
        # Same state memory as optax.adam: two moments per parameter and a count.
        state_bytes = {k: v["state_bytes"] for k, v in shape["optimizers"].items()}
        assert set(state_bytes.values()) == {8 * shape["num_params"] + 4}


def test_prints_the_markdown_table(quick_results):
    results, stdout = quick_results
    assert results["table"] in stdout
    assert stdout.count("`optax_snr.adam`") == 3
    assert stdout.count("`optax_snr.fused_adam`") == 3


def test_unknown_shape_is_an_error():
    proc = run_benchmark("step.py", "--shapes", "leaf,nope", timeout=120)
    assert proc.returncode == 2
    assert "nope" in proc.stderr


def test_donation_benchmark_counts_the_copies_of_the_wrong_order(tmp_path):
    out = tmp_path / "donation.json"
    proc = run_benchmark("donation.py", "--quick", "--shapes", "matrix,mlp", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["table"] in proc.stdout
    for name, num_leaves in (("matrix", 1), ("mlp", 6)):
        forms = results["shapes"][name]["forms"]
        assert forms["optax.adam"]["copies"] == 0
        assert forms["fused_adam documented"]["copies"] == 0
        # The old order copies each rotated buffer (params, mu, nu) at least once.
        assert forms["fused_adam rotated (old order)"]["copies"] >= 3 * num_leaves
        assert all(f["median_ms"] > 0 for f in forms.values())


def test_train_step_benchmark_runs_every_step(tmp_path):
    out = tmp_path / "train_step.json"
    proc = run_benchmark("train_step.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"optax.adam", "optax_snr.adam", "optax_snr.fused_adam"}
    assert results["optax.adam"]["ratio"] == 1.0
    # The chain compiles to optax.adam's kernels, so the whole step's memory is the same.
    assert results["optax_snr.adam"]["peak_mib"] == results["optax.adam"]["peak_mib"]
    assert all(r["median_ms"] > 0 and r["peak_mib"] > 0 for r in results.values())
    for name in results:
        assert f"| `{name}` |" in proc.stdout


def test_low_memory_benchmark_reports_every_contender(tmp_path):
    out = tmp_path / "low_memory.json"
    proc = run_benchmark(
        "low_memory.py", "memory", "--width", "256", "--reps", "1", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= {"optax.adam (f32)", "8-bit", "4-bit", "8-bit, fused_adam.step"}
    for name, r in results.items():
        assert f"| {name} |" in proc.stdout
        assert r["step_ms"] > 0 and r["opt_ms"] > 0
    base = results["optax.adam (f32)"]
    # 8 bytes of moments per parameter in float32; 1 + 1 (+ scales) at 8 bits, less at 4.
    assert base["state_bytes"] > 3.5 * results["8-bit"]["state_bytes"]
    assert results["8-bit"]["state_bytes"] > 1.8 * results["4-bit"]["state_bytes"]
    # The kernel keeps no float32 moments: its whole step peaks below float32 Adam's.
    assert results["8-bit, fused_adam.step"]["peak_bytes"] < base["peak_bytes"]


def test_low_memory_quality_records_the_held_out_curve(tmp_path):
    out = tmp_path / "quality.json"
    proc = run_benchmark(
        "low_memory.py",
        "quality",
        "--tasks",
        "zipf",
        "--steps",
        '{"zipf": 4}',
        "--lr-factors",
        "1",
        "--eval-every",
        "2",
        "--floor",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    columns = {
        "optax.adam (f32)",
        "8-bit",
        "4-bit",
        "bf16 stochastic",
        "bf16 nearest",
        "factored nu",
        "f32, other batches",
    }
    final, curves = results["zipf/0.01"], results["zipf/curves"]["0.01"]
    assert set(final) == set(curves) == columns
    for name in columns:
        assert set(curves[name]) == {"2", "4"}  # Every --eval-every steps and the last.
        assert curves[name]["4"] == final[name] and math.isfinite(final[name])
    assert "step 2/4: train" in proc.stderr  # The progress lines.
    assert "| step 2 | step 4 |" in proc.stdout  # The curve table.
