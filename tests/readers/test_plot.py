"""Tests for optax_snr.plot_diagnostics: the figure drawn from logged rows."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_snr


@pytest.fixture(scope="module")
def rows():
    """Rows logged every 5 steps of a small noisy problem, per leaf."""
    tx = optax_snr.adam(1e-2)
    params = {"dense": {"kernel": jnp.ones((4, 3))}, "bias": jnp.zeros(3)}
    state = tx.init(params)
    logged = []
    for t, key in enumerate(jax.random.split(jax.random.PRNGKey(0), 40), start=1):
        noise = jax.random.normal(key, (4, 3))
        grads = {"dense": {"kernel": params["dense"]["kernel"] + noise}, "bias": noise[0]}
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        if t % 5 == 0:
            diag = optax_snr.snr_diagnostics(state)
            scale = optax_snr.noise_scale(state, batch_size=8)
            row = optax_snr.flatten_diagnostics(diag, scale, per_leaf=True)
            logged.append(row | {"my_epoch": t / 10})
    return logged


def lines(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_four_panels_overall_and_leaves(rows, tmp_path):
    fig = optax_snr.plot_diagnostics(rows, leaves=["dense/kernel", "bias"], batch_size=8)
    signal, noise, snr, scale = fig.axes
    assert lines(signal) == ["all, mean", "all, median", "dense/kernel, mean", "bias, mean"]
    assert lines(noise)[:2] == ["all, mean", "all, median"]
    assert "dense/kernel, median" in lines(snr)
    assert {"all", "dense/kernel", "bias", "batch size 8"} <= set(lines(scale))
    np.testing.assert_array_equal(signal.get_lines()[0].get_xdata(), [r["count"] for r in rows])
    fig.savefig(tmp_path / "snr.png")
    assert (tmp_path / "snr.png").read_bytes()[:4] == b"\x89PNG"


def test_compact_rows_and_own_step_key(rows):
    compact = [{k: v for k, v in r.items() if k.count("/") <= 1} for r in rows]
    fig = optax_snr.plot_diagnostics(compact, step_key="my_epoch", title="run")
    assert fig.axes[0].get_xlabel() == "my_epoch"
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), np.arange(1, 9) / 2)


def test_unlogged_panels_say_so(rows):
    no_scale = [{k: v for k, v in r.items() if "noise_scale" not in k} for r in rows]
    fig = optax_snr.plot_diagnostics(no_scale)
    assert [t.get_text() for t in fig.axes[3].texts] == ["noise_scale not logged"]
    only_scale = [{k: v for k, v in r.items() if k == "count" or "noise_scale" in k} for r in rows]
    fig = optax_snr.plot_diagnostics(only_scale)
    assert [t.get_text() for t in fig.axes[0].texts] == ["signal not logged"]


def test_infinite_noise_scale_is_a_marker(rows):
    changed = [dict(r) for r in rows]
    changed[2]["noise_scale/b_simple"] = float("inf")
    fig = optax_snr.plot_diagnostics(changed)
    markers = [line for line in fig.axes[3].get_lines() if line.get_marker() == "^"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [rows[2]["count"]]


def test_draws_into_given_axes(rows):
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(3, 2).ravel()
    assert optax_snr.plot_diagnostics(rows, axes=axes[2:]) is fig
    assert lines(axes[2])[:1] == ["all, mean"] and not lines(axes[0])


def test_bad_input(rows):
    with pytest.raises(ValueError, match="empty"):
        optax_snr.plot_diagnostics([])
    with pytest.raises(ValueError, match="step_key"):
        optax_snr.plot_diagnostics(rows, step_key="epoch")
    with pytest.raises(ValueError, match="4 Axes"):
        optax_snr.plot_diagnostics(rows, axes=[None, None])
    compact = [{k: v for k, v in r.items() if k.count("/") <= 1} for r in rows]
    with pytest.raises(KeyError, match="per_leaf=True"):
        optax_snr.plot_diagnostics(compact, leaves=["bias"])
    with pytest.raises(KeyError, match="dense/kernel"):
        optax_snr.plot_diagnostics(rows, leaves=["nope"])


def test_without_matplotlib_a_clear_error(rows, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"optax_snr\[plot\]"):
        optax_snr.plot_diagnostics(rows)
