"""Low-memory moments: final loss against float32 Adam, and the train step's memory and time.

``python benchmarks/low_memory.py quality`` trains, from the same initialization
and the same batches, float32 ``optax.adam`` and ``optax_snr.adam`` with its
moments stored in 8 bits, 4 bits, stochastically rounded bfloat16, bfloat16
rounded to nearest, and with a factored noise, at learning rates x1/3, x1 and
x3 of each task's default, on three tasks:

* ``digits``: the demo's MLP (``optax_snr.demo.make_mlp``, hidden width 256) on
  the scikit-learn digits; final loss on the held-out quarter (the training
  loss falls to ~1e-3, where relative differences mean nothing);
* ``lm``: a character-level transformer language model (1.0M parameters) on the
  concatenated source of Python's standard library; final loss on held-out text;
* ``zipf``: an embedding table (20,000 x 64) and a linear classifier on tokens
  drawn from a Zipf law, so rare rows get rare, tiny gradients; final loss on a
  held-out sample.

``--eval-every N`` also scores the held-out set every N steps (a progress line
per checkpoint goes to stderr) and prints each learning rate's loss curve, so a
long run shows whether a format's gap to float32 grows or shrinks with
training; ``--floor`` adds float32 Adam on another batch order (the task's
run-to-run noise); ``--task-args`` passes keyword arguments to a task.

``python benchmarks/low_memory.py memory`` compiles a whole jitted, donated
train step (forward, backward, optimizer) of a 16.8M-parameter MLP at batch 32
on CPU and reports its peak memory from ``compiled.memory_analysis()``
(arguments + outputs - aliases + temporaries) and its median step time, each
against float32 ``optax.adam``, plus the optimizer step alone.

Results print as Markdown tables; nothing is written to disk unless ``--json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import optax_snr


def optimizers(
    lr: float, q4_block_size: int | None = None, only: list[str] | None = None
) -> dict[str, optax.GradientTransformation]:
    """Float32 Optax Adam and optax_snr.adam with each way of storing the moments.

    ``only`` keeps those columns (and float32 Adam, the reference)."""
    q8 = optax_snr.quantized(bits=8)
    q4 = optax_snr.quantized(bits=4, block_size=q4_block_size)
    sr = optax_snr.stochastic_rounding(jnp.bfloat16)
    every = {
        "optax.adam (f32)": optax.adam(lr),
        "8-bit": optax_snr.adam(lr, mu_dtype=q8, nu_dtype=q8),
        "4-bit": optax_snr.adam(lr, mu_dtype=q4, nu_dtype=q4),
        "bf16 stochastic": optax_snr.adam(lr, mu_dtype=sr, nu_dtype=sr),
        "bf16 nearest": optax_snr.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "factored nu": optax_snr.adam(lr, nu_dtype=optax_snr.factored()),
    }
    keep = {"optax.adam (f32)", *(only or every)}
    return {name: tx for name, tx in every.items() if name in keep}


def fit(
    tx: optax.GradientTransformation,
    params: Any,
    loss_fn: Callable,
    batches: Callable[[int], tuple],
    steps: int,
    evaluate: Callable[[Any], float],
    eval_every: int = 0,
    label: str = "",
) -> tuple[float, dict[int, float]]:
    """Trains ``steps`` steps; returns the final evaluation and ``{step: evaluation}``.

    With ``eval_every > 0`` the model is also evaluated (and a progress line
    goes to stderr) after every ``eval_every`` steps; the final step is always
    in the curve.
    """

    @jax.jit
    def step(params, state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    curve: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, *batches(i))
        done = i + 1
        if done == steps or (eval_every > 0 and done % eval_every == 0):
            curve[done] = evaluate(params)
            if eval_every > 0:
                print(
                    f"    {label} step {done}/{steps}: train {float(loss):.4f}, "
                    f"held-out {curve[done]:.4f} ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return curve[steps], curve


# --- (a) digits: the demo's MLP ------------------------------------------------------


def digits_task(steps: int, batch_seed: int = 0):
    from flax import nnx

    from optax_snr import demo

    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in demo.load_digits(0))
    graphdef, params = nnx.split(demo.make_mlp(0, hidden=256), nnx.Param)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rng = np.random.default_rng(batch_seed)
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(steps // 40 + 2)])
    batch = 32

    def batches(i):
        idx = order[i * batch : (i + 1) * batch]
        return x_train[idx], y_train[idx]

    evaluate = jax.jit(lambda p: loss_fn(p, x_test, y_test))
    return params, loss_fn, batches, lambda p: float(evaluate(p)), 1e-3


# --- (b) a character-level transformer on the standard library's source ---------------


def stdlib_text(limit: int = 4_000_000) -> np.ndarray:
    """The bytes of the standard library's .py files (ASCII only), in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        data = np.frombuffer(open(path, "rb").read(), np.uint8)
        data = data[data < 128]
        chunks.append(data)
        total += data.size
        if total >= limit:
            break
    return np.concatenate(chunks)[:limit]


def lm_task(
    steps: int,
    batch_seed: int = 0,
    width: int = 128,
    layers: int = 5,
    context: int = 64,
    batch: int = 16,
):
    text = stdlib_text()
    held_out, text = text[-200_000:], text[:-200_000]
    vocab, heads = 128, 4
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 6 * layers + 3))

    def dense(n_in, n_out):
        return jax.random.normal(next(keys), (n_in, n_out)) * (1.0 / math.sqrt(n_in))

    params = {
        "embed": jax.random.normal(next(keys), (vocab, width)) * 0.02,
        "pos": jax.random.normal(next(keys), (context, width)) * 0.02,
        "out": dense(width, vocab),
        "layers": [
            {
                "qkv": dense(width, 3 * width),
                "proj": dense(width, width) / math.sqrt(2 * layers),
                "up": dense(width, 4 * width),
                "down": dense(4 * width, width) / math.sqrt(2 * layers),
                "ln1": jnp.ones(width),
                "ln2": jnp.ones(width),
            }
            for _ in range(layers)
        ],
    }

    def norm(x, g):
        return g * (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5)

    mask = jnp.tril(jnp.ones((context, context), bool))

    def forward(params, tokens):
        x = params["embed"][tokens] + params["pos"]
        for layer in params["layers"]:
            h = norm(x, layer["ln1"]) @ layer["qkv"]
            q, k, v = (t.reshape(*t.shape[:-1], heads, -1) for t in jnp.split(h, 3, axis=-1))
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
            y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape)
            x = x + y @ layer["proj"]
            x = x + jax.nn.gelu(norm(x, layer["ln2"]) @ layer["up"]) @ layer["down"]
        return x @ params["out"]

    def loss_fn(params, tokens):
        logits = forward(params, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    rng = np.random.default_rng(batch_seed)
    starts = rng.integers(0, len(text) - context - 1, size=(steps, batch))
    windows = np.arange(context + 1)

    def batches(i):
        return (jnp.asarray(text[starts[i][:, None] + windows], jnp.int32),)

    eval_starts = np.random.default_rng(1).integers(0, len(held_out) - context - 1, size=256)
    eval_tokens = jnp.asarray(held_out[eval_starts[:, None] + windows], jnp.int32)
    evaluate = jax.jit(lambda p: loss_fn(p, eval_tokens))
    return params, loss_fn, batches, lambda p: float(evaluate(p)), 1e-3


# --- (c) Zipf-distributed tokens and an embedding table --------------------------------


def zipf_task(
    steps: int,
    batch_seed: int = 0,
    vocab: int = 20_000,
    dim: int = 64,
    classes: int = 16,
    label_noise: float = 0.1,
):
    key_e, key_w = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "embed": jax.random.normal(key_e, (vocab, dim)) * 0.1,
        "head": jax.random.normal(key_w, (dim, classes)) * (1.0 / math.sqrt(dim)),
    }
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, size=vocab)  # each token's class, to be memorized

    def draw(n, rng):
        tokens = rng.choice(vocab, size=n, p=p)
        noisy = rng.uniform(size=n) < label_noise  # 10% label noise by default
        y = np.where(noisy, rng.integers(0, classes, size=n), labels[tokens])
        return jnp.asarray(tokens, jnp.int32), jnp.asarray(y, jnp.int32)

    def loss_fn(params, tokens, y):
        logits = params["embed"][tokens] @ params["head"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    batch = 256
    batch_rng = np.random.default_rng(100 + batch_seed)
    data = [draw(batch, batch_rng) for _ in range(steps)]
    held_out = draw(50_000, np.random.default_rng(1))
    evaluate = jax.jit(lambda p: loss_fn(p, *held_out))
    return params, loss_fn, lambda i: data[i], lambda p: float(evaluate(p)), 1e-2


TASKS = {"digits": (digits_task, 600), "lm": (lm_task, 1000), "zipf": (zipf_task, 3000)}


def quality(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for task in args.tasks:
        make, default_steps = TASKS[task]
        steps = args.steps.get(task, default_steps)
        task_args = args.task_args.get(task, {})
        params, loss_fn, batches, evaluate, base_lr = make(steps, **task_args)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        print(
            f"\n## {task}: {n_params:,} parameters, {steps} steps, default lr {base_lr:g}"
            + (f", {task_args}" if task_args else "")
            + "\n"
        )
        columns = list(optimizers(1.0, only=args.only)) + (
            ["f32, other batches"] if args.floor else []
        )
        print("| lr | " + " | ".join(columns) + " |")
        print("|---|" + "---:|" * len(columns), flush=True)
        curves: dict[str, dict[str, dict[int, float]]] = {}
        results[f"{task}/curves"] = curves  # {lr: {optimizer: {step: held-out loss}}}
        for factor in args.lr_factors:
            lr = base_lr * factor
            row, curve = {}, {}
            runs = list(optimizers(lr, args.q4_block_size, args.only).items())
            if args.floor:  # the same training on other batches: the task's noise floor
                runs.append(("f32, other batches", optax.adam(lr)))
            for name, tx in runs:
                start = time.perf_counter()
                run_batches = batches
                if name == "f32, other batches":
                    _, _, run_batches, _, _ = make(steps, **{**task_args, "batch_seed": 1})
                with jax.numpy_dtype_promotion("standard"):
                    row[name], curve[name] = fit(
                        tx,
                        params,
                        loss_fn,
                        run_batches,
                        steps,
                        evaluate,
                        args.eval_every,
                        f"{task} lr={lr:g} {name}",
                    )
                print(
                    f"  {task} lr={lr:g} {name}: {row[name]:.4f} "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            base = row["optax.adam (f32)"]
            cells = [f"{base:.4f}"] + [
                f"{v:.4f} ({100 * (v / base - 1):+.1f}%)"
                for k, v in row.items()
                if k != "optax.adam (f32)"
            ]
            print(f"| {lr:g} (x{factor:.3g}) | " + " | ".join(cells) + " |", flush=True)
            results[f"{task}/{lr:g}"] = row
            curves[f"{lr:g}"] = curve
            if args.json:  # written after every row, so a long run that is cut short keeps its rows
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        if args.eval_every > 0:
            print_curves(task, curves)
    return results


def print_curves(task: str, curves: dict[str, dict[str, dict[int, float]]]) -> None:
    """For each learning rate: held-out loss at each checkpoint, relative to float32's."""
    for lr, curve in curves.items():
        base = curve["optax.adam (f32)"]
        checkpoints = sorted(base, key=int)  # int keys, or str keys read back from --json
        print(f"\n{task}, lr {lr}: held-out loss at each checkpoint (relative to f32)\n")
        print("| optimizer | " + " | ".join(f"step {c}" for c in checkpoints) + " |")
        print("|---|" + "---:|" * len(checkpoints))
        for name, points in curve.items():
            if name == "optax.adam (f32)":
                cells = [f"{points[c]:.4f}" for c in checkpoints]
            else:
                cells = [
                    f"{points[c]:.4f} ({100 * (points[c] / base[c] - 1):+.1f}%)"
                    for c in checkpoints
                ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(flush=True)


# --- memory and time of a whole train step ----------------------------------------------


def mlp(width: int = 2048, depth: int = 5, features: int = 2048, classes: int = 10):
    """An MLP of 16.8M parameters: 2048 -> 2048 (x4) -> 10, plus biases."""
    sizes = [features] + [width] * (depth - 1) + [classes]
    keys = jax.random.split(jax.random.PRNGKey(0), depth)
    return [
        {"w": jax.random.normal(k, (a, b)) / math.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_loss(params, x, y):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def memory_contenders() -> dict[str, tuple[Any, Callable, Callable]]:
    """``name -> (init, train_step, opt_step)``: the reference chains, and fused_adam's step."""
    contenders = {}
    for name, tx in optimizers(1e-3).items():

        def train_step(params, state, x, y, tx=tx):
            grads = jax.grad(mlp_loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        def opt_step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        contenders[name] = (tx.init, train_step, opt_step)
    q8, q4 = optax_snr.quantized(bits=8), optax_snr.quantized(bits=4)
    for name, fmt in [("f32", None), ("8-bit", q8), ("4-bit", q4)]:
        # fused_adam's documented form: step(params, state, grads), donated in that order.
        opt = optax_snr.fused_adam(1e-3, mu_dtype=fmt, nu_dtype=fmt)

        def fused_train_step(params, state, x, y, opt=opt):
            return opt.step(params, state, jax.grad(mlp_loss)(params, x, y))

        contenders[f"{name}, fused_adam.step"] = (opt.init, fused_train_step, opt.step)
    return contenders


def memory(args: argparse.Namespace) -> dict[str, Any]:
    params = mlp(width=args.width, features=args.width)
    n = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, args.width))
    y = jnp.zeros((32,), jnp.int32)
    grads = jax.tree.map(jnp.ones_like, params)
    results, runs = {}, {}
    contenders = memory_contenders()
    if args.contenders:
        contenders = {k: v for k, v in contenders.items() if k in args.contenders}
    for name, (init, train_step, opt_step) in contenders.items():
        with jax.numpy_dtype_promotion("standard"):
            state = init(params)
            compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, x, y)
            compiled = compiled.compile()
            ocompiled = jax.jit(opt_step, donate_argnums=(0, 1)).lower(params, state, grads)
            ocompiled = ocompiled.compile()
        results[name] = {
            "peak_bytes": peak_bytes(compiled),
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "state_bytes": sum(a.nbytes for a in jax.tree.leaves(state)),
            "opt_peak_bytes": peak_bytes(ocompiled),
            "opt_temp_bytes": ocompiled.memory_analysis().temp_size_in_bytes,
        }
        p, s = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)
        runs[name] = [compiled, ocompiled, p, s, [], []]
    # Interleaved: each round times every contender once, so load from other
    # processes falls on all of them alike. Two warm-up rounds are not timed.
    for i in range(args.reps + 2):
        for run in runs.values():
            compiled, ocompiled, p, s, times, otimes = run
            t0 = time.perf_counter()
            p, s = compiled(p, s, x, y)
            jax.block_until_ready(p)
            t1 = time.perf_counter()
            p, s = ocompiled(p, s, grads)
            jax.block_until_ready(p)
            t2 = time.perf_counter()
            if i >= 2:
                times.append(t1 - t0)
                otimes.append(t2 - t1)
            run[2], run[3] = p, s
    for name, run in runs.items():
        results[name]["step_ms"] = 1e3 * float(np.median(run[4]))
        results[name]["opt_ms"] = 1e3 * float(np.median(run[5]))
    base = results.get("optax.adam (f32)") or next(iter(results.values()))
    print(f"\n## Whole train step, MLP {n / 1e6:.1f}M params, batch 32, CPU\n")
    print(
        "| moments | state B/param | peak MB (ratio) | temp MB | step ms (ratio) "
        "| opt-only peak MB (ratio) | opt-only peak B/param | opt-only ms (ratio) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['state_bytes'] / n:.2f} "
            f"| {r['peak_bytes'] / 2**20:.1f} ({r['peak_bytes'] / base['peak_bytes']:.2f}) "
            f"| {r['temp_bytes'] / 2**20:.1f} "
            f"| {r['step_ms']:.1f} ({r['step_ms'] / base['step_ms']:.2f}) "
            f"| {r['opt_peak_bytes'] / 2**20:.1f} "
            f"({r['opt_peak_bytes'] / base['opt_peak_bytes']:.2f}) "
            f"| {r['opt_peak_bytes'] / n:.1f} "
            f"| {r['opt_ms']:.1f} ({r['opt_ms'] / base['opt_ms']:.2f}) |"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quality", "memory"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=json.loads, default={}, help="e.g. '{\"lm\": 500}'")
    parser.add_argument(
        "--task-args",
        type=json.loads,
        default={},
        help='keyword arguments of a task, e.g. \'{"zipf": {"label_noise": 0}}\'',
    )
    parser.add_argument("--lr-factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0])
    parser.add_argument("--reps", type=int, default=20, help="timed steps (memory)")
    parser.add_argument(
        "--q4-block-size", type=int, default=None, help="quality: block_size of the 4-bit column"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="quality: only these columns (and float32 Adam)"
    )
    parser.add_argument(
        "--contenders", nargs="+", help="memory: only these rows (default: all)", default=None
    )
    parser.add_argument(
        "--width", type=int, default=2048, help="memory: the MLP's width (2048: 16.8M params)"
    )
    parser.add_argument(
        "--floor", action="store_true", help="also train f32 Adam on other batches (noise floor)"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="quality: also evaluate (and log to stderr) every N steps, and print the curves",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = quality(args) if args.what == "quality" else memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
