"""Donation benchmark: fused_adam's documented jit form against the argument-order trap.

JAX pairs donated inputs with outputs of the same shape and dtype in order. With
``step(params, state, grads) -> (params, state)`` and ``donate_argnums=(0, 1)``
each donated buffer is paired with its own result, and the kernel updates it in
place. The earlier ``step(grads, state, params)`` with ``donate_argnums=(1, 2)``
paired the state's buffers with the params' results: the buffers rotate and
XLA copies each of them in full on every call. This script compiles and times,
interleaved in one process,

* ``optax.adam``: ``jit(update + apply_updates, donate_argnums=(0, 1))``;
* ``optax_snr.fused_adam``, documented form: ``jit(opt.step, donate_argnums=(0, 1))``;
* ``optax_snr.fused_adam``, rotated: the old argument order, ``(grads, state, params)``
  with ``donate_argnums=(1, 2)``;

and counts the array copies in each compiled HLO. Run
``python benchmarks/donation.py`` (``--help`` for the flags).
"""

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step as step_benchmark  # benchmarks/step.py, next to this file.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16 * 2**20, help="parameters per shape")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions")
    parser.add_argument("--shapes", default="matrix,tree", help="subset of leaf,tree,mlp,matrix")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.reps = 2**16, 3
    return args


def forms() -> dict[str, Any]:
    """The steps compared: name -> (optimizer, jitted step, whether grads come first)."""
    import jax
    import optax

    import optax_snr

    opt = optax_snr.fused_adam(1e-3)
    rotated = jax.jit(lambda g, s, p: opt.step(p, s, g), donate_argnums=(1, 2))
    return {
        "optax.adam": (optax.adam(1e-3), step_benchmark.make_step(optax.adam(1e-3)), False),
        "fused_adam documented": (opt, jax.jit(opt.step, donate_argnums=(0, 1)), False),
        "fused_adam rotated (old order)": (opt, rotated, True),
    }


def run_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    label, build = step_benchmark.SHAPES[name]
    params0 = build(args.size, jax.random.PRNGKey(0))
    grads = jax.block_until_ready(jax.tree.map(lambda p: 0.5 * p + 0.01, params0))
    entries = {}
    for form, (tx, jitted, grads_first) in forms().items():
        params = jax.tree.map(jnp.copy, params0)
        carry = (params, tx.init(params))
        call_args = (lambda c: (grads, c[1], c[0])) if grads_first else (lambda c: (*c, grads))
        hlo = jitted.lower(*call_args(carry)).compile().as_text()
        copies = [
            line
            for line in hlo.splitlines()
            if " copy(" in line
            and step_benchmark.max_elements(line.split(" = ", 1)[1], " copy(") > 1
        ]
        entries[form] = {"run": jitted, "args": call_args, "carry": carry, "copies": len(copies)}
    for entry in entries.values():  # Warm up (compiles through jit's cache).
        for _ in range(2):
            entry["carry"] = entry["run"](*entry["args"](entry["carry"]))
    times: dict[str, list[float]] = {k: [] for k in entries}
    names = list(entries)
    rng = np.random.default_rng(0)
    for _ in range(args.reps):
        for j in rng.permutation(len(names)):
            entry = entries[names[j]]
            jax.block_until_ready(entry["carry"])
            start = time.perf_counter()
            entry["carry"] = jax.block_until_ready(entry["run"](*entry["args"](entry["carry"])))
            times[names[j]].append(time.perf_counter() - start)
    base = np.asarray(times["optax.adam"])
    return {
        "label": label,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params0))),
        "num_leaves": len(jax.tree.leaves(params0)),
        "forms": {
            k: {
                "median_ms": float(np.median(times[k]) * 1e3),
                "ratio_to_optax_median": float(np.median(np.asarray(times[k]) / base)),
                "copies": entries[k]["copies"],
            }
            for k in entries
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in step_benchmark.SHAPES]
    if unknown:
        print(
            f"unknown shapes {unknown}; choose from {sorted(step_benchmark.SHAPES)}",
            file=sys.stderr,
        )
        return 2
    results: dict[str, Any] = {
        "args": vars(args),
        "machine": step_benchmark.machine(),
        "shapes": {},
    }
    lines = [
        "| shape | params / leaves | step | median ms | paired ratio to optax.adam | copies |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in shapes:
        shape = results["shapes"][name] = run_shape(name, args)
        size = f"{shape['num_params'] / 1e6:.3g}M / {shape['num_leaves']}"
        for form, r in shape["forms"].items():
            lines.append(
                f"| {shape['label']} | {size} | {form} | {r['median_ms']:.2f} "
                f"| {r['ratio_to_optax_median']:.3f} | {r['copies']} |"
            )
    results["machine"]["load_average_after"] = os.getloadavg()
    results["table"] = "\n".join(lines)
    print(results["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
