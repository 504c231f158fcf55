"""Step-time benchmark: optax_snr.adam against optax.adam and the memory bound.

An Adam step is memory-bound: it reads params, grads, mu and nu and writes params,
mu and nu, 28 bytes per float32 parameter at best. This script times a jitted,
donated step (``tx.update`` + ``optax.apply_updates``) of each optimizer on three
shapes (a fourth on request), ``optax_snr.fused_adam`` in its documented form
``jax.jit(opt.step, donate_argnums=(0, 1))``, interleaved in one process so that
both see the same machine load, and reports per-repetition paired ratios and
their medians. It also times two reference kernels that bound what any Adam step
can reach on this machine, and reads from the compiled HLO how many fusions the
step has, how many arrays it copies and how many bytes per parameter it moves.

Run ``python benchmarks/step.py`` (``--help`` for the flags). Set
``--multi-output-fusion`` to compile everything with XLA:CPU's multi-output
fusion pass (``--xla_backend_extra_options=xla_cpu_use_multi_output_fusion``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

MULTI_OUTPUT_FUSION_FLAG = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=16 * 2**20, help="parameters in shapes (a) and (b)"
    )
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per shape")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--loop-steps", type=int, default=10, help="steps per jitted fori_loop (second timing)"
    )
    parser.add_argument(
        "--retrace-steps", type=int, default=100, help="steps over which recompiles are counted"
    )
    parser.add_argument(
        "--shapes",
        default="leaf,tree,mlp",
        help="comma-separated subset of leaf,tree,mlp,matrix",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="small sizes and few reps (smoke)")
    parser.add_argument(
        "--multi-output-fusion",
        action="store_true",
        help=f"set XLA_FLAGS={MULTI_OUTPUT_FUSION_FLAG} before jax starts",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.reps, args.warmup, args.retrace_steps = 2**16, 3, 1, 5
        args.loop_steps = 2
    return args


# Everything below imports jax lazily, after XLA_FLAGS has been set.


def leaf_params(size: int, key: Any) -> dict[str, Any]:
    """Shape (a): one flat leaf of ``size`` parameters."""
    import jax

    return {"w": jax.random.normal(key, (size,))}


def transformer_params(size: int, key: Any) -> dict[str, Any]:
    """Shape (b): 244 leaves shaped like a 20-layer pre-LN transformer.

    With ``size = 16 * 2**20`` the model width is 256 (MLP 1024, vocabulary
    3584, 256 positions): 16.78M parameters. Smaller sizes shrink the width.
    """
    import jax
    import jax.numpy as jnp

    layers, d = 20, 256
    while d > 8 and (layers * 12.4 * d * d) > size:
        d //= 2
    ff = 4 * d
    per_layer = 3 * d * d + 3 * d + d * d + d + 2 * d * ff + ff + d + 4 * d
    vocab = max(1, (size - layers * per_layer - d * d - 2 * d) // d)
    keys = iter(jax.random.split(key, 16 * layers + 8))
    normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)
    norm = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
    params: dict[str, Any] = {"embed": normal(vocab, d), "pos": normal(d, d), "ln_f": norm()}
    for i in range(layers):
        params[f"layer_{i:02d}"] = {
            "ln_1": norm(),
            "qkv": {"kernel": normal(d, 3 * d), "bias": jnp.zeros(3 * d)},
            "out": {"kernel": normal(d, d), "bias": jnp.zeros(d)},
            "ln_2": norm(),
            "fc_1": {"kernel": normal(d, ff), "bias": jnp.zeros(ff)},
            "fc_2": {"kernel": normal(ff, d), "bias": jnp.zeros(d)},
        }
    return params


def mlp_params(size: int, key: Any) -> dict[str, Any]:
    """Shape (c): a tiny MLP, 64 -> 32 -> 32 -> 10 (3,466 parameters)."""
    import jax
    import jax.numpy as jnp

    del size
    k = jax.random.split(key, 3)
    sizes = [(64, 32), (32, 32), (32, 10)]
    return {
        f"dense_{i}": {"kernel": jax.random.normal(k[i], s) / s[0] ** 0.5, "bias": jnp.zeros(s[1])}
        for i, s in enumerate(sizes)
    }


def matrix_params(size: int, key: Any) -> dict[str, Any]:
    """Shape (d): one square 2-D leaf of about ``size`` parameters (4096 x 4096 by default)."""
    import jax

    side = int(size**0.5)
    return {"w": jax.random.normal(key, (side, side))}


SHAPES: dict[str, tuple[str, Callable[[int, Any], Any]]] = {
    "leaf": ("(a) one leaf", leaf_params),
    "tree": ("(b) transformer-like tree", transformer_params),
    "mlp": ("(c) tiny MLP", mlp_params),
    "matrix": ("(d) one square matrix", matrix_params),
}


def optimizers() -> dict[str, Any]:
    """The optimizers compared; the first is the baseline of every ratio."""
    import optax

    import optax_snr

    return {
        "optax.adam": optax.adam(1e-3),
        "optax_snr.adam": optax_snr.adam(1e-3),
        "optax_snr.fused_adam": optax_snr.fused_adam(1e-3),
    }


def make_step(tx: Any) -> Callable[..., Any]:
    """A jitted step ``(params, state, grads) -> (params, state)`` donating params and state.

    For ``optax_snr.fused_adam`` this is exactly its documented form,
    ``jax.jit(opt.step, donate_argnums=(0, 1))``, with no wrapper around ``step``.
    """
    import jax
    import optax

    if hasattr(tx, "step"):  # A fused update-and-apply (optax_snr.fused_adam).
        return jax.jit(tx.step, donate_argnums=(0, 1))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def compilations(jitted: Callable[..., Any]) -> int:
    """How many specializations ``jitted`` has compiled: the entries of jit's cache."""
    return int(jitted._cache_size())


def make_loop(tx: Any, num_steps: int) -> Callable[..., Any]:
    """``num_steps`` steps inside one jitted ``lax.fori_loop``: no per-step dispatch.

    This is how a training loop runs the optimizer: inside a compiled train step
    (or a scan over steps), where params and state cross the Python/XLA boundary
    once per call rather than once per optimizer step.
    """
    import jax

    body = make_step(tx).__wrapped__  # The step before jit.

    def loop(params, state, grads):
        return jax.lax.fori_loop(0, num_steps, lambda _, c: body(*c, grads), (params, state))

    return jax.jit(loop, donate_argnums=(0, 1))


def reference_kernels() -> dict[str, Callable[..., Any]]:
    """Kernels that bound an Adam step's time on this machine.

    ``stream`` reads one buffer and writes one (8 bytes per element): its time
    times 28/8 is what a step moving 28 bytes per parameter would take at the
    bandwidth an XLA loop reaches (a hand-written loop can reach more).
    ``dispatch`` is a donated step that does nothing, with the optimizer's
    trees: the cost of calling a jitted function with that many arrays.
    ``adam_traffic`` is Adam's exact dataflow with trivial arithmetic: it reads
    p, g, m, v and writes p, m, v, and XLA compiles it the way it compiles Adam.
    """
    import jax

    def stream(x, g):
        del g
        return (x * 1.0000001,)

    def adam_traffic(p, m, v, g):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * (g * g)
        return p - 0.001 * m * v, m, v

    def no_op(params, state, grads):
        del grads
        return params, state

    return {
        "dispatch": jax.jit(no_op, donate_argnums=(0, 1)),
        "stream": jax.jit(stream, donate_argnums=0),
        "adam_traffic": jax.jit(adam_traffic, donate_argnums=(0, 1, 2)),
    }


def hlo_stats(jitted: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Compile time and what the compiled HLO says about fusions and traffic.

    The step is lowered and compiled afresh (``lower().compile()``, which does
    not use jit's cache) to time the compilation. In the optimized HLO text,
    every ``fusion(...)`` instruction of the entry computation is one kernel;
    ``cost_analysis()["bytes accessed"]`` is XLA's count of the bytes those
    kernels read and write (each operand once per kernel that reads it);
    ``memory_analysis()`` gives argument, output, alias and temporary sizes.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    text = compiled.as_text()
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    lines = entry.splitlines()
    fusions = [line for line in lines if " fusion(" in line]
    array_fusions = [line for line in fusions if max_elements(line.split(" = ", 1)[1]) > 1]
    # Copies of arrays anywhere in the program: a donated buffer that cannot be
    # updated in place (say, donated arguments in another order than the
    # results) is copied in full on every call.
    copies = [
        line
        for line in text.splitlines()
        if " copy(" in line and max_elements(line.split(" = ", 1)[1], " copy(") > 1
    ]
    # XLA's cost analysis does not look inside custom calls (the fused kernel):
    # count their traffic as the bytes of their operands plus their results.
    sizes = {}
    for line in lines:
        match = re.match(r"\s*(?:ROOT )?%(\S+) = (\([^=]*?\)|\S+) ", line)
        if match:
            sizes[match.group(1)] = shape_bytes(match.group(2))
    custom_bytes = 0
    custom_calls = [line for line in lines if " custom-call(" in line]
    for line in custom_calls:
        result = line.split(" = ", 1)[1].split(" custom-call(", 1)[0]
        operands = re.findall(r"%([^\s,)]+)", line.split(" custom-call(", 1)[1].split(")", 1)[0])
        custom_bytes += shape_bytes(result) + sum(sizes.get(name, 0) for name in operands)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # Older jax returns one dict per device.
        cost = cost[0]
    memory = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "fusions": len(fusions),
        "array_fusions": len(array_fusions),
        "custom_calls": len(custom_calls),
        "copies": len(copies),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))) + custom_bytes,
        "temp_bytes": int(getattr(memory, "temp_size_in_bytes", -1)),
        "alias_bytes": int(getattr(memory, "alias_size_in_bytes", -1)),
    }


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[4,3]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def max_elements(text: str, op: str = " fusion(") -> int:
    """Elements of the largest array shape of an HLO result (the text before ``op``)."""
    shape = text.split(op, 1)[0]
    counts = [1]
    for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        counts.append(count)
    return max(counts)


def tree_bytes(tree: Any) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree))


def run_shape(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times every optimizer and reference kernel on one shape, interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    label, build = SHAPES[name]
    params0 = build(args.size, jax.random.PRNGKey(0))
    num_params = sum(x.size for x in jax.tree.leaves(params0))
    # A fixed gradient: the step's cost does not depend on its values.
    grads = jax.block_until_ready(jax.tree.map(lambda p: 0.5 * p + 0.01, params0))

    # One copy of params and state per candidate: steps donate their inputs.
    candidates: dict[str, dict[str, Any]] = {}
    loops: dict[str, dict[str, Any]] = {}
    for opt_name, tx in optimizers().items():
        step = make_step(tx)
        params = jax.tree.map(jnp.copy, params0)
        state = tx.init(params)
        stats = hlo_stats(step, params, state, grads)
        stats["state_bytes"] = tree_bytes(state)
        candidates[opt_name] = {"run": step, "carry": (params, state), **stats}
        looped = jax.tree.map(jnp.copy, params0)
        loops[opt_name] = {
            "run": make_loop(tx, args.loop_steps),
            "carry": (looped, tx.init(looped)),
        }

    flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(params0)])
    g_flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(grads)])
    kernels = reference_kernels()
    noop_params = jax.tree.map(jnp.copy, params0)
    references: dict[str, dict[str, Any]] = {
        "dispatch": {
            "run": kernels["dispatch"],
            "carry": (noop_params, optimizers()["optax.adam"].init(noop_params)),
            "grads": grads,
        },
        "stream": {"run": kernels["stream"], "carry": (flat + 0,), "grads": g_flat},
        "adam_traffic": {
            "run": kernels["adam_traffic"],
            "carry": (flat + 0, jnp.zeros_like(flat), jnp.zeros_like(flat)),
            "grads": g_flat,
        },
    }
    for ref in references.values():
        ref.update(hlo_stats(ref["run"], *ref["carry"], ref["grads"]))

    def call(entry, grads_in):
        out = entry["run"](*entry["carry"], grads_in)
        entry["carry"] = out
        return out

    def timed(entry, grads_in):
        jax.block_until_ready(entry["carry"])
        start = time.perf_counter()
        jax.block_until_ready(call(entry, grads_in))
        return time.perf_counter() - start

    entries = [(c, grads) for c in [*candidates.values(), *loops.values()]] + [
        (r, r["grads"]) for r in references.values()
    ]
    for entry, g in entries:
        for _ in range(args.warmup):
            call(entry, g)
    loop_names = [f"{k} (loop)" for k in loops]
    times: dict[str, list[float]] = {k: [] for k in [*candidates, *loop_names, *references]}
    names = list(times)
    rng = np.random.default_rng(0)
    for _ in range(args.reps):
        # A fresh random order each repetition, so that no step always follows
        # the same other step (which leaves the caches and memory in its state).
        for j in rng.permutation(len(entries)):
            entry, g = entries[j]
            times[names[j]].append(timed(entry, g))

    base = np.asarray(times["optax.adam"])
    loop_base = np.asarray(times["optax.adam (loop)"])
    result: dict[str, Any] = {
        "label": label,
        "num_params": int(num_params),
        "num_leaves": len(jax.tree.leaves(params0)),
        "optimizers": {},
        "references": {},
    }
    for opt_name, cand in candidates.items():
        t = np.asarray(times[opt_name])
        loop = np.asarray(times[f"{opt_name} (loop)"])
        result["optimizers"][opt_name] = {
            "median_ms": float(np.median(t) * 1e3),
            "ratio_to_optax_median": float(np.median(t / base)),
            "ratio_to_optax_iqr": [float(q) for q in np.percentile(t / base, [25, 75])],
            "loop_median_ms_per_step": float(np.median(loop) * 1e3 / args.loop_steps),
            "loop_ratio_to_optax_median": float(np.median(loop / loop_base)),
            "loop_ratio_to_optax_iqr": [
                float(q) for q in np.percentile(loop / loop_base, [25, 75])
            ],
            **{
                k: cand[k]
                for k in (
                    "compile_s",
                    "fusions",
                    "array_fusions",
                    "custom_calls",
                    "copies",
                    "state_bytes",
                )
            },
            "bytes_per_param": cand["bytes_accessed"] / num_params,
            "temp_bytes": cand["temp_bytes"],
        }
    for ref_name, ref in references.items():
        t = np.asarray(times[ref_name])
        result["references"][ref_name] = {
            "median_ms": float(np.median(t) * 1e3),
            "fusions": ref["fusions"],
            "bytes_per_param": ref["bytes_accessed"] / num_params,
        }
    stream_ms = result["references"]["stream"]["median_ms"]
    result["references"]["bandwidth_bound"] = {
        "median_ms": stream_ms * 28 / 8,
        "bandwidth_GBps": 8 * num_params / (stream_ms * 1e-3) / 1e9,
    }

    # Every candidate ran the same number of steps from the same start.
    final = {k: c["carry"][0] for k, c in candidates.items()}
    ref_params = final["optax.adam"]
    for opt_name, p in final.items():
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_params), strict=True)
        )
        result["optimizers"][opt_name]["max_abs_diff_to_optax"] = diff

    # Recompilations: run retrace_steps more steps through jit's cache.
    for opt_name, cand in candidates.items():
        before = compilations(cand["run"])
        for _ in range(args.retrace_steps):
            call(cand, grads)
        jax.block_until_ready(cand["carry"])
        after = compilations(cand["run"])
        result["optimizers"][opt_name]["retraces_after_first"] = after - before
        result["optimizers"][opt_name]["traces_total"] = after
    return result


def machine() -> dict[str, Any]:
    import jax
    import jaxlib
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def format_table(results: dict[str, Any]) -> str:
    """The Markdown table that benchmarks/README.md quotes."""
    lines = [
        "| shape | params / leaves | step | median ms | paired ratio to optax.adam "
        "| in-loop ms/step | in-loop paired ratio "
        "| fusions (array) + custom calls | copies | bytes/param (HLO) | compile s | state MB "
        "| retraces |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in results["shapes"].values():
        size = f"{shape['num_params'] / 1e6:.3g}M / {shape['num_leaves']}"
        for name, o in shape["optimizers"].items():
            lines.append(
                f"| {shape['label']} | {size} | `{name}` | {o['median_ms']:.2f} "
                f"| {o['ratio_to_optax_median']:.3f} "
                f"| {o['loop_median_ms_per_step']:.2f} | {o['loop_ratio_to_optax_median']:.3f} "
                f"| {o['fusions']} ({o['array_fusions']}) + {o['custom_calls']} | {o['copies']} "
                f"| {o['bytes_per_param']:.1f} | {o['compile_s']:.2f} "
                f"| {o['state_bytes'] / 2**20:.1f} | {o['retraces_after_first']} |"
            )
        refs = shape["references"]
        base_ms = shape["optimizers"]["optax.adam"]["median_ms"]
        traffic, bound, dispatch = refs["adam_traffic"], refs["bandwidth_bound"], refs["dispatch"]
        lines.append(
            f"| {shape['label']} | {size} | dispatch: donated no-op step, same trees "
            f"| {dispatch['median_ms']:.2f} | {dispatch['median_ms'] / base_ms:.3f} "
            f"| | | {dispatch['fusions']} | | | | | |"
        )
        lines.append(
            f"| {shape['label']} | {size} | adam_traffic kernel (4 reads, 3 writes) "
            f"| {traffic['median_ms']:.2f} | {traffic['median_ms'] / base_ms:.3f} "
            f"| | | {traffic['fusions']} | | {traffic['bytes_per_param']:.1f} | | | |"
        )
        lines.append(
            f"| {shape['label']} | {size} | XLA-stream bound (28 B/param at "
            f"{bound['bandwidth_GBps']:.0f} GB/s) | {bound['median_ms']:.2f} "
            f"| {bound['median_ms'] / base_ms:.3f} | | | | | 28.0 | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.multi_output_fusion:
        flags = os.environ.get("XLA_FLAGS", "")
        if MULTI_OUTPUT_FUSION_FLAG not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {MULTI_OUTPUT_FUSION_FLAG}".strip()
    if "jax" in sys.modules and args.multi_output_fusion:
        print("warning: jax was imported before XLA_FLAGS was set", file=sys.stderr)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "command": " ".join(
            ["python", "benchmarks/step.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "args": vars(args),
        "machine": machine(),
        "shapes": {},
    }
    for name in shapes:
        results["shapes"][name] = run_shape(name, args)
        print(f"{name}: done", file=sys.stderr, flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    table = format_table(results)
    results["table"] = table
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
