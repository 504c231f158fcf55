"""Gradient noise scale on real training: Adam's state against direct estimates.

Two checks of ``optax_snr.noise_scale`` on the digits MLP of ``python -m
optax_snr.demo`` (Flax NNX, 64 -> 64 -> 64 -> 10, 1,347 training images):

1. **Against gradients.** Training with ``optax_snr.adam`` at batch 32, at
   several steps the estimate read from the optimizer state is compared, at the
   same parameters, with (a) McCandlish et al.'s unbiased two-batch estimator
   (squared norms of mini-batch gradients at batch sizes 32 and 512, averaged
   over many draws with replacement) and (b) the exact value for sampling from
   the training set, from all 1,347 per-example gradients. Two learning
   rates, 1e-3 (the demo's) and 1e-4, show when the state's figure holds.
2. **The prediction.** Train to a fixed full-training-set loss at batch sizes 8
   to 1,024 (best of a few learning rates each), count the steps, fit
   McCandlish's ``S = S_min (1 + B_crit / B)`` and compare ``B_crit`` with the
   noise scale measured when the batch-32 run reaches the target.

Prints two tables and writes ``noise_scale.png`` into ``--out`` (default
``benchmarks/results/``, ignored by git). Run: ``python benchmarks/noise_scale.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_snr
from optax_snr import demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the PNG")
    parser.add_argument("--steps", type=int, default=3000, help="steps of the batch-32 runs")
    parser.add_argument("--target", type=float, default=0.05, help="training loss to reach")
    parser.add_argument("--max-steps", type=int, default=6000, help="per run of the sweep")
    parser.add_argument("--draws", type=int, default=100, help="two-batch draws per point")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class Problem:
    """The digits MLP as pure functions of its parameters."""

    def __init__(self, seed: int):
        self.x, self.y, _, _ = (jnp.asarray(a) for a in demo.load_digits(seed))
        self.graphdef, self.params0 = nnx.split(demo.make_mlp(seed), nnx.Param)

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(self.graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def sq_norm(tree: Any) -> jax.Array:
    return sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))


def exact_noise_scale(problem: Problem, params: Any) -> tuple[float, float, float]:
    """``(B_simple, tr Sigma, |G|^2)`` for sampling from the training set, exactly."""

    @jax.jit
    def moments(params):
        per_example = jax.vmap(lambda x, y: jax.grad(problem.loss)(params, x[None], y[None]))(
            problem.x, problem.y
        )
        mean = jax.tree.map(lambda g: g.mean(0), per_example)
        trace = sum(
            jnp.sum((g - m[None]) ** 2) / g.shape[0]
            for g, m in zip(jax.tree.leaves(per_example), jax.tree.leaves(mean), strict=True)
        )
        return trace, sq_norm(mean)

    trace, grad_sq = (float(v) for v in moments(params))
    return trace / grad_sq, trace, grad_sq


def two_batch_noise_scale(
    problem: Problem, params: Any, rng: np.random.Generator, draws: int, small=32, big=512
) -> float:
    """McCandlish et al.'s Appendix A estimator from gradients at two batch sizes.

    ``|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
    ``tr Sigma = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)`` are each
    unbiased; their averages over ``draws`` pairs are divided at the end.
    """
    grad_norm = jax.jit(
        lambda p, idx: sq_norm(jax.grad(problem.loss)(p, problem.x[idx], problem.y[idx]))
    )
    n = problem.x.shape[0]
    smalls = [float(grad_norm(params, rng.integers(0, n, small))) for _ in range(draws)]
    bigs = [float(grad_norm(params, rng.integers(0, n, big))) for _ in range(draws)]
    g_small, g_big = np.mean(smalls), np.mean(bigs)
    grad_sq = (big * g_big - small * g_small) / (big - small)
    trace = (g_small - g_big) / (1 / small - 1 / big)
    return trace / grad_sq if grad_sq > 0 else np.inf


def make_chunk(problem: Problem, tx: optax.GradientTransformation):
    """Jitted: ``len(batches)`` Adam steps over the given index batches."""

    @jax.jit
    def chunk(params, state, batches):
        def step(carry, idx):
            params, state = carry
            grads = jax.grad(problem.loss)(params, problem.x[idx], problem.y[idx])
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, state), batches)
        return params, state, problem.loss(params, problem.x, problem.y)

    return chunk


def compare_with_gradients(problem: Problem, args: argparse.Namespace) -> list[dict]:
    """Part 1: the state's estimate against gradients, at several steps."""
    batch, checkpoints = 32, sorted({100, 300, 1000, 2000, args.steps})
    rng = np.random.default_rng(args.seed)
    n = problem.x.shape[0]
    runs = {lr: optax_snr.adam(lr) for lr in (1e-3, 1e-4)}
    chunks = {b2: make_chunk(problem, tx) for b2, tx in runs.items()}
    carry = {b2: (problem.params0, tx.init(problem.params0)) for b2, tx in runs.items()}
    rows, done = [], 0
    for stop in checkpoints:
        batches = jnp.asarray(rng.integers(0, n, (stop - done, batch)))
        losses = {}
        for lr in runs:
            params, state, loss = chunks[lr](*carry[lr], batches)
            carry[lr] = (params, state)
            losses[lr] = float(loss)
        done = stop
        params, state = carry[1e-3]
        est = optax_snr.noise_scale(state, batch)
        exact, trace, grad_sq = exact_noise_scale(problem, params)
        two = two_batch_noise_scale(problem, params, rng, args.draws)
        # The learning-rate-1e-4 run has its own parameters and its own truth.
        slow_params, slow_state = carry[1e-4]
        est_slow = optax_snr.noise_scale(slow_state, batch)
        exact_slow, _, _ = exact_noise_scale(problem, slow_params)
        two_slow = two_batch_noise_scale(problem, slow_params, rng, args.draws)
        rows.append(
            {
                "step": stop,
                "loss": losses[1e-3],
                "state": float(est.b_simple),
                "two_batch": two,
                "exact": exact,
                "trace": trace,
                "grad_sq": grad_sq,
                "state_trace": float(est.trace_sigma),
                "state_grad_sq": float(est.grad_sq_norm),
                "slow_loss": losses[1e-4],
                "slow_state": float(est_slow.b_simple),
                "slow_exact": exact_slow,
                "slow_two_batch": two_slow,
            }
        )
    return rows


def steps_to_target(problem, batch, learning_rate, args, rng) -> int | None:
    tx = optax_snr.adam(learning_rate)
    chunk = make_chunk(problem, tx)
    params, state = problem.params0, tx.init(problem.params0)
    n, every = problem.x.shape[0], 10
    for done in range(0, args.max_steps, every):
        batches = jnp.asarray(rng.integers(0, n, (every, batch)))
        params, state, loss = chunk(params, state, batches)
        if float(loss) <= args.target:
            return done + every
    return None


def sweep(problem: Problem, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Part 2: steps to the target loss against batch size; best learning rate each."""
    rows = []
    for batch in (8, 16, 32, 64, 128, 256, 512, 1024):
        best = None
        for learning_rate in (1e-3, 3e-3, 1e-2, 3e-2):
            rng = np.random.default_rng(args.seed)
            steps = steps_to_target(problem, batch, learning_rate, args, rng)
            if steps is not None and (best is None or steps < best[0]):
                best = (steps, learning_rate)
        rows.append(
            {
                "batch": batch,
                "steps": best[0] if best else None,
                "learning_rate": best[1] if best else None,
            }
        )
    # McCandlish's S = S_min (1 + B_crit / B): linear in 1/B.
    fit_rows = [r for r in rows if r["steps"] is not None]
    inv_b = np.array([1 / r["batch"] for r in fit_rows])
    steps = np.array([r["steps"] for r in fit_rows], np.float64)
    slope, intercept = np.polyfit(inv_b, steps, 1)
    fit = {"s_min": intercept, "b_crit": slope / intercept if intercept > 0 else np.inf}

    # The noise scale when the batch-32, learning-rate-1e-3 run reaches the target.
    tx = optax_snr.adam(1e-3)
    chunk = make_chunk(problem, tx)
    params, state = problem.params0, tx.init(problem.params0)
    rng = np.random.default_rng(args.seed)
    n = problem.x.shape[0]
    for _ in range(0, args.max_steps, 10):
        params, state, loss = chunk(params, state, jnp.asarray(rng.integers(0, n, (10, 32))))
        if float(loss) <= args.target:
            break
    fit["state_at_target"] = float(optax_snr.noise_scale(state, 32).b_simple)
    fit["exact_at_target"] = exact_noise_scale(problem, params)[0]
    fit["step_at_target"] = int(optax.tree.get(state, "count"))
    return rows, fit


def plot(part1: list[dict], part2: list[dict], fit: dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    steps = [r["step"] for r in part1]
    for prefix, color, lr in (("", "C3", "1e-3"), ("slow_", "C0", "1e-4")):
        ax1.plot(
            steps, [r[f"{prefix}exact"] for r in part1], "-o", color=color, label=f"lr {lr}: exact"
        )
        ax1.plot(
            steps,
            [r[f"{prefix}two_batch"] for r in part1],
            ":s",
            color=color,
            label=f"lr {lr}: two-batch",
        )
        finite = [
            (s, r[f"{prefix}state"])
            for s, r in zip(steps, part1, strict=True)
            if np.isfinite(r[f"{prefix}state"])
        ]
        if finite:
            ax1.plot(*zip(*finite, strict=True), "--^", color=color, label=f"lr {lr}: Adam state")
    ax1.set(xscale="log", yscale="log", xlabel="step (batch 32)", ylabel=r"$B_\mathrm{simple}$")
    ax1.set_title("Noise scale during training")
    ax1.legend(fontsize="small")
    ok = [r for r in part2 if r["steps"] is not None]
    b = np.array([r["batch"] for r in ok], np.float64)
    ax2.plot(b, [r["steps"] for r in ok], "k-o", label="steps to target (best lr)")
    grid = np.geomspace(b.min(), b.max(), 100)
    ax2.plot(
        grid,
        fit["s_min"] * (1 + fit["b_crit"] / grid),
        "C0--",
        label=rf"fit $S_{{min}}(1 + B_{{crit}}/B)$, $B_{{crit}}$={fit['b_crit']:.0f}",
    )
    ax2.axvline(
        fit["state_at_target"], color="C3", label=f"Adam state: {fit['state_at_target']:.0f}"
    )
    ax2.axvline(
        fit["exact_at_target"], color="k", ls=":", label=f"exact: {fit['exact_at_target']:.0f}"
    )
    ax2.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps")
    ax2.set_title("Steps to the target loss against batch size")
    ax2.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    problem = Problem(args.seed)
    part1 = compare_with_gradients(problem, args)
    print("Part 1: B_simple at the same parameters (optax_snr.adam, batch 32)")
    print(
        f"{'':>6} | {'learning rate 1e-3':^51} | {'learning rate 1e-4':^42}\n"
        f"{'step':>6} | {'loss':>7} {'exact':>7} {'two-batch':>9} {'state':>7} "
        f"{'state |G|^2/exact':>17} | {'loss':>7} {'exact':>7} {'two-batch':>9} "
        f"{'state':>7} {'ratio':>7}"
    )
    for r in part1:
        print(
            f"{r['step']:>6} | {r['loss']:>7.3f} {r['exact']:>7.0f} {r['two_batch']:>9.0f} "
            f"{r['state']:>7.0f} {r['state_grad_sq'] / r['grad_sq']:>17.2f} | "
            f"{r['slow_loss']:>7.3f} {r['slow_exact']:>7.0f} {r['slow_two_batch']:>9.0f} "
            f"{r['slow_state']:>7.0f} {r['slow_state'] / r['slow_exact']:>7.2f}"
        )
    part2, fit = sweep(problem, args)
    print(f"\nPart 2: steps to training loss {args.target} (best of lr 1e-3, 3e-3, 1e-2, 3e-2)")
    print(f"{'batch':>6} {'steps':>7} {'examples':>9} {'lr':>7}")
    for r in part2:
        steps = r["steps"] if r["steps"] is not None else "-"
        examples = r["steps"] * r["batch"] if r["steps"] is not None else "-"
        print(f"{r['batch']:>6} {steps:>7} {examples:>9} {r['learning_rate'] or '-':>7}")
    print(
        f"fit S = S_min (1 + B_crit / B): S_min = {fit['s_min']:.0f}, "
        f"B_crit = {fit['b_crit']:.0f}; at the target (step {fit['step_at_target']} of "
        f"the batch-32, lr-1e-3 run) Adam's state says B_simple = "
        f"{fit['state_at_target']:.0f}, the per-example gradients {fit['exact_at_target']:.0f}"
    )
    path = os.path.join(args.out, "noise_scale.png")
    plot(part1, part2, fit, path)
    print(f"\nwrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
