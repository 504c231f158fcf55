"""Signal, noise, SNR and noise-scale plots for any model, from logged rows.

Matplotlib is an optional extra (``pip install 'optax_snr[plot]'``): it is
imported inside :func:`plot_diagnostics` only, so the package never needs it.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["plot_diagnostics"]

_PANELS = ("signal", "noise", "snr", "noise_scale")


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plot_diagnostics needs matplotlib, an optional extra: "
            "pip install 'optax_snr[plot]' (or pip install matplotlib)."
        ) from e
    return Figure, FigureCanvasAgg


def _column(rows: Sequence[Mapping[str, float]], key: str) -> list[float]:
    return [float(row.get(key, math.nan)) for row in rows]


def _has(rows: Sequence[Mapping[str, float]], key: str) -> bool:
    return any(key in row for row in rows)


def plot_diagnostics(
    rows: Sequence[Mapping[str, float]],
    *,
    leaves: Sequence[str] = (),
    step_key: str = "count",
    batch_size: int | None = None,
    axes: Sequence[Any] | None = None,
    title: str | None = None,
) -> Any:
    r"""Draws signal, noise, SNR and noise scale from rows logged during training.

    Each row is a dict as :func:`~optax_snr.flatten_diagnostics` returns it,
    logged at any steps (every N steps, once per epoch, ...), possibly with
    keys of your own. Four panels, against ``row[step_key]``:

    * **signal** :math:`|\hat m|`, mean (solid) and median (dotted);
    * **noise** :math:`\sqrt{\hat v}`, mean and median;
    * **SNR** :math:`|\hat m| / (\sqrt{\hat v} + \epsilon)`, median with the
      10%-90% band: Adam's step per unit learning rate;
    * **noise scale** :math:`B_\text{simple}` (rows with
      ``"noise_scale/b_simple"``, from :func:`~optax_snr.noise_scale`), with
      ``batch_size`` drawn as a horizontal line when given: batches well below
      the curve are noise-dominated, and larger ones would still cut the steps.

    Overall figures are drawn in black; each leaf named in ``leaves`` adds one
    colored line per panel (its mean signal and noise, median SNR and
    :math:`B_\text{simple}`), for which the rows need the per-leaf keys
    (``flatten_diagnostics(..., per_leaf=True)``). Panels whose keys were not
    logged say so instead of raising. Values at or below zero are left out of
    the logarithmic axes; an infinite noise scale (noise dominates, see
    :func:`~optax_snr.noise_scale`) is drawn as a triangle at the top.

    Args:
      rows: the logged rows, in step order.
      leaves: names of leaves to draw besides the overall figures, as in
        ``SnrDiagnostics.per_leaf`` (``"dense/kernel"``).
      step_key: the row key for the horizontal axis (the optimizer's
        ``"count"`` by default; any key of your own, such as an epoch).
      batch_size: the batch size used, drawn on the noise-scale panel.
      axes: four matplotlib Axes to draw into (for example part of a larger
        figure); by default a new 2x2 figure is made.
      title: a title for the new figure.

    Returns:
      The matplotlib ``Figure`` (``fig.savefig("snr.png")`` writes it). It is
      made without pyplot, so no display or global state is needed; in a
      notebook it displays as the cell's value.

    Raises:
      ImportError: if matplotlib is not installed.
      ValueError: if ``rows`` is empty, ``axes`` is not four Axes, or a row
        lacks ``step_key``.
      KeyError: if a leaf in ``leaves`` was not logged, naming the leaves that were.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(1e-2)
      >>> params = {"w": jnp.ones(4)}
      >>> state, rows = tx.init(params), []
      >>> for t in range(1, 31):
      ...     grads = {"w": params["w"] * jnp.float32((-1.0) ** t) + jnp.float32(0.1)}
      ...     _, state = tx.update(grads, state)
      ...     if t % 5 == 0:
      ...         diag = optax_snr.snr_diagnostics(state)
      ...         ns = optax_snr.noise_scale(state, batch_size=8)
      ...         rows.append(optax_snr.flatten_diagnostics(diag, ns, per_leaf=True))
      >>> fig = optax_snr.plot_diagnostics(rows, leaves=["w"], batch_size=8)
      >>> len(fig.axes)
      4
    """
    if not rows:
        raise ValueError("plot_diagnostics: rows is empty; log at least one row.")
    missing = [i for i, row in enumerate(rows) if step_key not in row]
    if missing:
        raise ValueError(
            f"plot_diagnostics: row {missing[0]} has no {step_key!r} (step_key); "
            f"its keys start with {sorted(rows[missing[0]])[:5]}."
        )
    for leaf in leaves:
        if not any(k.startswith(f"{leaf}/") for k in rows[0] if k.count("/") >= 2):
            logged = sorted({k.rsplit("/", 2)[0] for k in rows[0] if k.count("/") >= 2})
            raise KeyError(
                f"plot_diagnostics: leaf {leaf!r} was not logged; log the rows with "
                "flatten_diagnostics(..., per_leaf=True). Logged leaves: "
                f"{logged or 'none'}."
            )
    figure_class, canvas_class = _matplotlib()
    if axes is None:
        fig = figure_class(figsize=(11, 7.5), layout="constrained")
        canvas_class(fig)
        axes = list(fig.subplots(2, 2).ravel())
        if title:
            fig.suptitle(title)
    else:
        axes = list(axes)
        if len(axes) != len(_PANELS):
            raise ValueError(f"plot_diagnostics: axes must be 4 Axes, got {len(axes)}.")
        fig = axes[0].figure
    ax_signal, ax_noise, ax_snr, ax_scale = axes
    steps = _column(rows, step_key)
    colors = [f"C{i % 10}" for i in range(len(leaves))]

    def positive(values: list[float]) -> list[float]:
        return [v if v > 0 and math.isfinite(v) else math.nan for v in values]

    def unlogged(ax: Any, what: str) -> None:
        ax.text(0.5, 0.5, f"{what} not logged", ha="center", va="center", transform=ax.transAxes)

    for ax, quantity, label in (
        (ax_signal, "signal", r"signal $|\hat m|$"),
        (ax_noise, "noise", r"noise $\sqrt{\hat v}$"),
    ):
        ax.set(title=label, xlabel=step_key)
        if not _has(rows, f"{quantity}/mean"):
            unlogged(ax, quantity)
            continue
        ax.plot(steps, positive(_column(rows, f"{quantity}/mean")), "k-", label="all, mean")
        ax.plot(steps, positive(_column(rows, f"{quantity}/median")), "k:", label="all, median")
        for leaf, color in zip(leaves, colors, strict=True):
            values = positive(_column(rows, f"{leaf}/{quantity}/mean"))
            ax.plot(steps, values, "-", color=color, label=f"{leaf}, mean")
        ax.set_yscale("log")
        ax.legend(fontsize="small")

    ax_snr.set(
        title=r"SNR $|\hat m| / (\sqrt{\hat v} + \epsilon)$",
        xlabel=step_key,
        ylabel="step / learning rate",
    )
    if _has(rows, "snr/median"):
        ax_snr.fill_between(
            steps,
            positive(_column(rows, "snr/q10")),
            positive(_column(rows, "snr/q90")),
            color="0.8",
            label="all, 10%-90%",
        )
        ax_snr.plot(steps, positive(_column(rows, "snr/median")), "k-", label="all, median")
        for leaf, color in zip(leaves, colors, strict=True):
            values = positive(_column(rows, f"{leaf}/snr/median"))
            ax_snr.plot(steps, values, "-", color=color, label=f"{leaf}, median")
        ax_snr.set_yscale("log")
        ax_snr.legend(fontsize="small")
    else:
        unlogged(ax_snr, "snr")

    ax_scale.set(
        title=r"gradient noise scale $B_\mathrm{simple}$", xlabel=step_key, ylabel="examples"
    )
    if _has(rows, "noise_scale/b_simple"):
        series = [("noise_scale/b_simple", "k", "all")]
        series += [
            (f"{leaf}/noise_scale/b_simple", c, leaf)
            for leaf, c in zip(leaves, colors, strict=True)
        ]
        finite = [
            v for key, _, _ in series for v in positive(_column(rows, key)) if not math.isnan(v)
        ]
        top = max([*finite, batch_size or 1]) * 2
        for key, color, label in series:
            values = _column(rows, key)
            ax_scale.plot(steps, positive(values), "-", color=color, label=label)
            infinite = [s for s, v in zip(steps, values, strict=True) if v == math.inf]
            if infinite:
                mark = r"inf ($|G|^2$ estimate $\leq 0$)" if label == "all" else None
                ax_scale.plot(infinite, [top] * len(infinite), "^", color=color, ms=5, label=mark)
        if batch_size is not None:
            ax_scale.axhline(batch_size, color="C3", ls="--", label=f"batch size {batch_size}")
        ax_scale.set_yscale("log")
        ax_scale.legend(fontsize="small")
    else:
        unlogged(ax_scale, "noise_scale")
    return fig
