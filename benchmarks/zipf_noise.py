"""Why bfloat16 round-to-nearest moments change the zipf task's loss: the stored noise.

``python benchmarks/zipf_noise.py`` trains ``benchmarks/low_memory.py``'s zipf
task (embedding table 20,000 x 64, tokens from a Zipf law) with float32
``optax.adam`` and with ``optax_snr.adam`` storing both moments in bfloat16
rounded to nearest, from the same initialization and batches, and prints, at a
few steps, sqrt(nu_bf16 / nu_f32) of the embedding rows grouped by token rank
(and of the head): how much smaller the bfloat16 run's steps are.

In bfloat16 ``0.999 * nu + 0.001 * g**2`` rounds back to ``nu`` unless ``g**2``
is several times ``nu``: the stored noise cannot decay, so it lags behind as the
gradients shrink, and the steps shrink with it, like a learning-rate decay.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from low_memory import zipf_task

import optax_snr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr-factor", type=float, default=1.0)
    parser.add_argument("--label-noise", type=float, default=0.1)
    args = parser.parse_args(argv)
    checkpoints = sorted({s for s in (100, 300, 1000, args.steps) if s <= args.steps})
    params, loss_fn, batches, _, base_lr = zipf_task(args.steps, label_noise=args.label_noise)
    lr = base_lr * args.lr_factor
    runs = {
        "f32": optax.adam(lr),
        "bf16": optax_snr.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    }
    nus: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for name, tx in runs.items():

        @jax.jit
        def step(params, state, *batch, tx=tx):
            grads = jax.grad(loss_fn)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        with jax.numpy_dtype_promotion("standard"):
            p, state = params, tx.init(params)
            for i in range(args.steps):
                p, state = step(p, state, *batches(i))
                if i + 1 in checkpoints:
                    nus[name, i + 1] = jax.tree.map(
                        lambda x: np.asarray(x, np.float32), state[0].nu
                    )
    rank = np.arange(params["embed"].shape[0])  # token i has Zipf rank i + 1
    groups = {"rank < 100": rank < 100, "100-1999": (rank >= 100) & (rank < 2000)}
    groups["rank >= 2000"] = rank >= 2000
    print(f"zipf, lr {lr:g}, label noise {args.label_noise:g}: sqrt(nu_bf16 / nu_f32)\n")
    print("| step | " + " | ".join(f"embed, {g}" for g in groups) + " | head |")
    print("|---:|" + "---:|" * (len(groups) + 1))
    for s in checkpoints:
        f32, bf16 = nus["f32", s], nus["bf16", s]
        cells = [np.sqrt(bf16["embed"][m].mean() / f32["embed"][m].mean()) for m in groups.values()]
        cells.append(np.sqrt(bf16["head"].mean() / f32["head"].mean()))
        print(f"| {s} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
