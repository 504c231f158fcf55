"""See the SNR on real data: ``python -m optax_snr.demo``.

Trains a small Flax NNX multilayer perceptron on scikit-learn's bundled
handwritten digits (1,797 real 8x8 images, no download) with mini-batches,
three times from the same initialization and the same batch order: with
plain gradient descent (:func:`optax.sgd`, the fixed-step rule the SNR
reading starts from), with :func:`optax_snr.adam` and with :func:`optax.adam`.
It prints a table of test accuracy, final loss and wall time per optimizer and
writes into ``--out``:

* ``metrics.csv``: one row per optimizer and epoch (losses, test accuracy and,
  for the Adams, the signal, noise and SNR summaries of
  :func:`optax_snr.snr_diagnostics` and the gradient noise scale of
  :func:`optax_snr.noise_scale`, as :func:`optax_snr.flatten_diagnostics`
  names them);
* ``training.png``: the loss curves, and Adam's signal, noise, SNR and noise
  scale per epoch, drawn by :func:`optax_snr.plot_diagnostics`.

It also prints the final noise-scale estimate next to the batch size used.

Flax, scikit-learn, matplotlib and tqdm are the ``demo`` extras
(``pip install optax_snr[demo]``); they are imported here only, so the core
package does not need them. The functions are importable, so the notebooks
reuse the data loading and the model.
"""

import argparse
import csv
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_snr

__all__ = [
    "OPTIMIZERS",
    "RunResult",
    "format_table",
    "load_digits",
    "main",
    "make_mlp",
    "noise_scale_advice",
    "parse_args",
    "plot",
    "run",
    "train",
    "write_csv",
]

# The optimizers compared, in the order of the table. The SNR reading starts
# from plain gradient descent, w <- w - learning_rate * g; Adam replaces g by
# the pseudo SNR m_hat / (sqrt(v_hat) + eps), whose scale is about 1, so the
# two rules need learning rates of different scales.
OPTIMIZERS = ("sgd", "optax_snr.adam", "optax.adam")

# Columns of metrics.csv after "optimizer" and "epoch": the losses, then the
# compact row of flatten_diagnostics (the optimizer's step count, the overall
# signal, noise and SNR summaries, and the noise scale).
_STATISTICS = ("mean", "min", "q10", "median", "q90", "max")
_SNR_COLUMNS = (
    "count",
    *(f"{q}/{s}" for q in ("signal", "noise", "snr") for s in _STATISTICS),
    "noise_scale/b_simple",
    "noise_scale/trace_sigma",
    "noise_scale/grad_sq_norm",
)
_COLUMNS = ("train_loss", "test_loss", "test_accuracy", *_SNR_COLUMNS)


@dataclass
class RunResult:
    """One optimizer's training run: per-epoch history and final numbers."""

    name: str
    learning_rate: float
    history: list[dict[str, float]] = field(default_factory=list)  # One dict per epoch.
    test_accuracy: float = math.nan
    train_loss: float = math.nan  # On the whole training set, after the last epoch.
    test_loss: float = math.nan
    wall_s: float = math.nan  # Compilation included.
    batch_size: int = 0
    noise_scale: float = math.nan  # B_simple from the final state (NaN without moments).


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def _check_writable(parser: argparse.ArgumentParser, out: str) -> None:
    """Creates ``out`` if needed and checks that a file can be written there."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot write to {out!r}: {e.strerror or e}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the command line; bad values exit with code 2."""
    parser = _Parser(
        prog="python -m optax_snr.demo",
        description=(
            "Train a small Flax NNX MLP on scikit-learn's handwritten digits with "
            "plain SGD, optax_snr.adam and optax.adam; print a table and write "
            "metrics.csv and training.png (loss curves; Adam's signal |m_hat|, "
            "noise sqrt(v_hat) and SNR per epoch)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=_positive_int, default=30, help="passes over the data")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="mini-batch size")
    parser.add_argument(
        "--learning-rate", type=_positive_float, default=1e-3, help="the Adams' learning rate"
    )
    parser.add_argument(
        "--sgd-learning-rate", type=_positive_float, default=0.1, help="plain SGD's learning rate"
    )
    parser.add_argument(
        "--seed", type=_non_negative_int, default=0, help="data split, initialization and batches"
    )
    parser.add_argument("--out", default="snr-demo", help="directory for the CSV and the PNG")
    args = parser.parse_args(argv)
    if args.batch_size > _NUM_TRAIN:
        parser.error(
            f"argument --batch-size: {args.batch_size} is more than the "
            f"{_NUM_TRAIN} training images"
        )
    _check_writable(parser, args.out)
    return args


# 1,797 images, a quarter of them held out for testing.
_NUM_IMAGES, _TEST_FRACTION = 1797, 0.25
_NUM_TRAIN = _NUM_IMAGES - math.ceil(_NUM_IMAGES * _TEST_FRACTION)


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits as ``(x_train, y_train, x_test, y_test)``: float32 in [0, 1], int32 labels.

    A stratified split, shuffled with ``seed``; a quarter is held out.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # Pixel intensities are 0..16.
    y = y.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_TEST_FRACTION, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def make_mlp(seed: int = 0, hidden: int = 64) -> Any:
    """A Flax NNX MLP 64 -> hidden -> hidden -> 10 with ReLUs, initialized from ``seed``."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden1 = nnx.Linear(64, hidden, rngs=rngs)
            self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
            self.out = nnx.Linear(hidden, 10, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            x = jax.nn.relu(self.hidden1(x))
            x = jax.nn.relu(self.hidden2(x))
            return self.out(x)

    return MLP(nnx.Rngs(seed))


def _make_optimizer(name: str, args: argparse.Namespace) -> tuple[Any, float]:
    if name == "sgd":
        return optax.sgd(args.sgd_learning_rate), args.sgd_learning_rate
    if name == "optax_snr.adam":
        return optax_snr.adam(args.learning_rate), args.learning_rate
    if name == "optax.adam":
        return optax.adam(args.learning_rate), args.learning_rate
    raise ValueError(f"unknown optimizer {name!r}")


def train(
    name: str,
    tx: optax.GradientTransformation,
    data: tuple[np.ndarray, ...],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    learning_rate: float = math.nan,
    progress: bool = True,
) -> RunResult:
    """Trains a fresh MLP with ``tx``; returns its per-epoch history and final numbers.

    The model is Flax NNX, split once into its graph and parameters so that the
    train step is a pure function under ``jax.jit``. For optimizers that have
    moments, the signal, noise and SNR of the state and the gradient noise
    scale are logged once per epoch, as :func:`optax_snr.flatten_diagnostics`
    names them (``"snr/median"``, ``"noise_scale/b_simple"``, ...).
    """
    from flax import nnx
    from tqdm import tqdm

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    graphdef, params = nnx.split(make_mlp(seed), nnx.Param)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        return loss, accuracy

    opt_state = tx.init(params)

    def diagnose(state):
        diagnostics = optax_snr.snr_diagnostics(state)
        return optax_snr.flatten_diagnostics(diagnostics, optax_snr.noise_scale(state, batch_size))

    try:
        diagnose(opt_state)
    except ValueError:  # No moments (plain SGD).
        diagnose = None

    result = RunResult(name=name, learning_rate=learning_rate, batch_size=batch_size)
    rng = np.random.default_rng(seed)  # The same batches for every optimizer.
    num_batches = x_train.shape[0] // batch_size  # The last partial batch is dropped.
    bar = tqdm(range(epochs), desc=f"{name:>15}", unit="epoch", disable=not progress)
    for epoch in bar:
        order = rng.permutation(x_train.shape[0])
        losses = []
        for b in range(num_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
            losses.append(loss)
        test_loss, test_accuracy = evaluate(params, x_test, y_test)
        row = {
            "train_loss": float(jnp.mean(jnp.stack(losses))),
            "test_loss": float(test_loss),
            "test_accuracy": float(test_accuracy),
        }
        if diagnose is not None:
            row |= diagnose(opt_state)
        result.history.append({"epoch": epoch + 1, **row})
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", acc=f"{row['test_accuracy']:.3f}")
    bar.close()

    train_loss, _ = evaluate(params, x_train, y_train)
    result.train_loss = float(train_loss)
    result.test_loss, result.test_accuracy = (float(v) for v in evaluate(params, x_test, y_test))
    if diagnose is not None:
        result.noise_scale = result.history[-1]["noise_scale/b_simple"]
    result.wall_s = time.perf_counter() - start
    return result


def run(args: argparse.Namespace, *, progress: bool = True) -> list[RunResult]:
    """Trains one MLP per optimizer in :data:`OPTIMIZERS`, all from ``args.seed``."""
    data = load_digits(args.seed)
    results = []
    for name in OPTIMIZERS:
        tx, learning_rate = _make_optimizer(name, args)
        results.append(
            train(
                name,
                tx,
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                learning_rate=learning_rate,
                progress=progress,
            )
        )
    return results


def format_table(results: Sequence[RunResult]) -> str:
    """The summary table: one line per optimizer."""
    header = (
        f"{'optimizer':<16}{'learning rate':>14}{'test accuracy':>15}"
        f"{'final train loss':>18}{'test loss':>11}{'wall time (s)':>15}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.name:<16}{r.learning_rate:>14g}{r.test_accuracy:>15.4f}"
            f"{r.train_loss:>18.4f}{r.test_loss:>11.4f}{r.wall_s:>15.1f}"
        )
    return "\n".join(lines)


def write_csv(results: Sequence[RunResult], path: str) -> None:
    """One row per optimizer and epoch; the SNR columns are empty for SGD."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "epoch", *_COLUMNS])
        for r in results:
            for row in r.history:
                values = [repr(row[c]) if c in row else "" for c in _COLUMNS]
                writer.writerow([r.name, row["epoch"], *values])


def noise_scale_advice(result: RunResult) -> str:
    """One line: the final noise-scale estimate next to the batch size used."""
    b, n = result.batch_size, result.noise_scale
    head = f"{result.name}: gradient noise scale B_simple ~ {n:,.0f} at the end (batch size {b})"
    if math.isnan(n):
        return f"{head}: not enough steps to estimate it."
    if n == math.inf:
        return (
            f"{head}: the state cannot tell the gradient from the noise (its |G|^2 "
            "estimate is not positive; see optax_snr.noise_scale on when that happens)."
        )
    if n > 2 * b:
        return (
            f"{head}: the gradient noise scale suggests batches up to ~{n:,.0f} "
            "would still help (fewer steps for the same examples)."
        )
    return f"{head}: batches much larger than ~{max(n, 1):,.0f} would mostly repeat each other."


def plot(results: Sequence[RunResult], path: str, adam: str = "optax_snr.adam") -> None:
    """Training loss and test accuracy of all runs; Adam's signal, noise, SNR, noise scale."""
    # Matplotlib's Agg backend, on a Figure of our own: no display is needed and
    # pyplot's global state (a notebook's backend, say) is left untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 11), layout="constrained")
    FigureCanvasAgg(fig)
    (ax_loss, ax_acc), *diagnostic_axes = fig.subplots(3, 2)
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        style = "--" if r.name == "optax.adam" else "-"  # Identical to optax_snr.adam.
        ax_loss.plot(epochs, [h["train_loss"] for h in r.history], style, label=r.name)
        ax_acc.plot(epochs, [h["test_accuracy"] for h in r.history], style, label=r.name)
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    ax_acc.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy")
    ax_loss.legend()
    ax_acc.legend()

    (r,) = [r for r in results if r.name == adam]
    axes = [ax for row in diagnostic_axes for ax in row]
    optax_snr.plot_diagnostics(r.history, step_key="epoch", batch_size=r.batch_size, axes=axes)
    for ax in axes:
        ax.set_title(f"{adam}: {ax.get_title()}")
    fig.suptitle("Handwritten digits (scikit-learn), Flax NNX MLP, the same batches for each")
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns the exit code."""
    args = parse_args(argv)
    try:
        import flax  # noqa: F401
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        print(
            f"python -m optax_snr.demo: error: {e.name} is missing; "
            "install the extras with: pip install 'optax_snr[demo]'",
            file=sys.stderr,
        )
        return 1
    results = run(args)
    print(format_table(results))
    print()
    for r in results:
        if r.history and "noise_scale/b_simple" in r.history[-1]:  # The Adams.
            print(noise_scale_advice(r))
    csv_path = os.path.join(args.out, "metrics.csv")
    png_path = os.path.join(args.out, "training.png")
    write_csv(results, csv_path)
    plot(results, png_path)
    print(f"\nwrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
