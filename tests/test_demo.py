"""Tests for ``python -m optax_snr.demo``: a short run end to end, and its errors."""

import csv
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from optax_snr import demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def start_cli(*args):
    """Starts the demo in a fresh interpreter; returns the Popen."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "optax_snr.demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def run_cli(*args, timeout=240):
    """Runs the demo to the end; returns ``(returncode, stdout, stderr)``."""
    proc = start_cli(*args)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_run_writes_outputs_and_is_reproducible(tmp_path):
    args = ("--epochs", "2", "--batch-size", "64", "--seed", "3")
    # Two runs side by side, each in its own interpreter.
    procs = [start_cli(*args, "--out", str(tmp_path / out)) for out in ("a", "b")]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        for name in demo.OPTIMIZERS:
            assert name in stdout
        assert "test accuracy" in stdout and "wall time" in stdout
        # The final noise-scale estimate, next to the batch size used.
        assert "optax_snr.adam: gradient noise scale B_simple ~" in stdout
        assert "(batch size 64)" in stdout

    # The same seed gives the same numbers, byte for byte.
    csv_a = (tmp_path / "a" / "metrics.csv").read_bytes()
    assert csv_a == (tmp_path / "b" / "metrics.csv").read_bytes()
    for out in ("a", "b"):
        assert (tmp_path / out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_rows(tmp_path / "a" / "metrics.csv")
    assert [(r["optimizer"], r["epoch"]) for r in rows] == [
        (name, str(epoch)) for name in demo.OPTIMIZERS for epoch in (1, 2)
    ]
    by_name = {name: [r for r in rows if r["optimizer"] == name] for name in demo.OPTIMIZERS}
    # SGD has no moments: its SNR columns are empty; the Adams' are filled in.
    assert all(r["snr/median"] == "" for r in by_name["sgd"])
    assert all(r["noise_scale/b_simple"] == "" for r in by_name["sgd"])
    for r in by_name["optax_snr.adam"]:
        assert np.isfinite(float(r["snr/median"]))
        assert float(r["signal/mean"]) > 0 and float(r["noise/mean"]) > 0
        # B_simple is positive (possibly inf: noise dominates), never negative.
        assert float(r["noise_scale/b_simple"]) > 0
        assert float(r["noise_scale/trace_sigma"]) > 0
        assert float(r["count"]) == int(r["epoch"]) * (demo._NUM_TRAIN // 64)
    # optax_snr.adam is a bit-exact drop-in: the two Adam runs are identical.
    strip = lambda rs: [{k: v for k, v in r.items() if k != "optimizer"} for r in rs]
    assert strip(by_name["optax_snr.adam"]) == strip(by_name["optax.adam"])
    # Two epochs of training already beat chance (0.1) by far.
    assert all(float(r["test_accuracy"]) > 0.5 for r in rows if r["epoch"] == "2")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--epochs", "-3"), "--epochs"),
        (("--batch-size", "0"), "--batch-size"),
        (("--out", "{file}/sub"), "--out"),
    ],
)
def test_bad_flags_give_one_line_and_exit_code_2(tmp_path, flags, message):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    flags = [f.format(file=blocker) for f in flags]
    returncode, stdout, stderr = run_cli(*flags, timeout=120)
    assert returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("python -m optax_snr.demo: error:")
    assert message in lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""


@pytest.mark.parametrize(
    "flags",
    [
        ["--learning-rate", "nan"],
        ["--learning-rate", "-1e-3"],
        ["--sgd-learning-rate", "0"],
        ["--epochs", "two"],
        ["--seed", "-1"],
        ["--batch-size", "100000"],
        ["--no-such-flag"],
    ],
)
def test_more_bad_flags_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args([*flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_noise_scale_advice():
    result = demo.RunResult(name="x", learning_rate=1e-3, batch_size=32, noise_scale=400.0)
    assert "batches up to ~400 would still help" in demo.noise_scale_advice(result)
    result.noise_scale = 20.0
    assert "mostly repeat" in demo.noise_scale_advice(result)
    result.noise_scale = float("inf")
    assert "cannot tell the gradient from the noise" in demo.noise_scale_advice(result)
    result.noise_scale = float("nan")
    assert "not enough steps" in demo.noise_scale_advice(result)


def test_core_and_demo_module_import_without_the_extras():
    # flax, scikit-learn, matplotlib and tqdm are optional: importing the package,
    # or the demo module itself (for --help), must not pull them in.
    code = (
        "import sys, optax_snr, optax_snr.demo; "
        "loaded = [m for m in ('flax', 'sklearn', 'matplotlib', 'tqdm') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--learning-rate", "--seed", "--out"):
        assert flag in text


def test_defaults(tmp_path):
    out = tmp_path / "new" / "dir"
    args = demo.parse_args(["--out", str(out)])
    assert out.is_dir()  # Created up front, so a bad --out fails before training.
    assert (args.epochs, args.batch_size, args.learning_rate, args.seed) == (30, 32, 1e-3, 0)


def test_data_split():
    x_train, y_train, x_test, y_test = demo.load_digits(seed=0)
    assert x_train.shape == (demo._NUM_TRAIN, 64) and x_test.shape[1] == 64
    assert len(x_train) + len(x_test) == 1797
    assert x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert set(np.unique(y_test)) == set(range(10))  # Stratified: every digit is tested.


def test_seed_changes_the_split_and_the_initialization():
    a, b = demo.load_digits(seed=0), demo.load_digits(seed=1)
    assert not np.array_equal(a[1], b[1])  # Other images in the training set.
    from flax import nnx

    params = [jax.tree.leaves(nnx.state(demo.make_mlp(seed), nnx.Param)) for seed in (0, 0, 1)]
    assert all(np.array_equal(x, y) for x, y in zip(params[0], params[1], strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(params[0], params[2], strict=True))
