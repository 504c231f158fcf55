"""Whole-train-step benchmark: forward, backward and optimizer, as users run it.

An optimizer kernel that is faster in isolation matters only as far as it shortens
the whole step. This script jits and donates one training step of an MLP (forward,
backward, optimizer update and apply) for ``optax.adam``, ``optax_snr.adam`` and
``optax_snr.fused_adam`` in its documented form, times them interleaved in one
process (medians and the median of paired ratios to ``optax.adam``), and reports
each compiled step's peak memory from ``compiled.memory_analysis()`` (arguments +
outputs - aliases + temporaries).

    python benchmarks/train_step.py            # 16.8M-parameter MLP, batch 32
    python benchmarks/train_step.py --quick    # small and fast (smoke test)
"""

import argparse
import json
import random
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from low_memory import mlp, mlp_loss, peak_bytes  # The same 16.8M-parameter MLP.

import optax_snr


def steps(lr: float) -> dict[str, tuple[Any, Any]]:
    """Each entry: (init, train_step(params, state, x, y) -> (params, state))."""

    def chain_step(tx):
        def train_step(params, state, x, y):
            grads = jax.grad(mlp_loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return tx.init, train_step

    fused = optax_snr.fused_adam(lr)

    def fused_step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        return fused.step(params, state, grads)  # The documented argument order.

    return {
        "optax.adam": chain_step(optax.adam(lr)),
        "optax_snr.adam": chain_step(optax_snr.adam(lr)),
        "optax_snr.fused_adam": (fused.init, fused_step),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    params = mlp(args.width, args.depth, args.width)
    n = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.width), jnp.float32)
    y = jnp.zeros((args.batch,), jnp.int32)
    compiled, live = {}, {}
    with jax.numpy_dtype_promotion("standard"):  # optax.adam needs implicit promotion.
        for name, (init, step) in steps(1e-3).items():
            state = init(params)
            compiled[name] = (
                jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, y).compile()
            )
            live[name] = (jax.tree.map(jnp.copy, params), state)
    times: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    for rep in range(args.reps + 2):  # Two warm-up rounds, then timed rounds.
        random.Random(rep).shuffle(order)
        for name in order:
            p, s = live[name]
            t0 = time.perf_counter()
            p, s = compiled[name](p, s, x, y)
            jax.block_until_ready(p)
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
            live[name] = (p, s)
    base = np.asarray(times["optax.adam"])
    results = {
        name: {
            "median_ms": 1e3 * float(np.median(t)),
            "ratio": float(np.median(np.asarray(t) / base)),
            "peak_mib": peak_bytes(compiled[name]) / 2**20,
            "peak_ratio": peak_bytes(compiled[name]) / peak_bytes(compiled["optax.adam"]),
        }
        for name, t in times.items()
    }
    print(
        f"\n## Whole train step: MLP {n / 1e6:.2f}M parameters, batch {args.batch}, "
        f"{jax.default_backend()}, {args.reps} interleaved repetitions\n"
    )
    print("| step | median ms | paired ratio to optax.adam | peak MiB (ratio) |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| `{name}` | {r['median_ms']:.2f} | {r['ratio']:.3f} "
            f"| {r['peak_mib']:.1f} ({r['peak_ratio']:.2f}) |"
        )
    return {"parameters": n, "batch": args.batch, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2048, help="hidden and input width")
    parser.add_argument("--depth", type=int, default=5, help="number of layers")
    parser.add_argument("--batch", type=int, default=32, help="batch size")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.depth, args.reps = 64, 3, 3
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
