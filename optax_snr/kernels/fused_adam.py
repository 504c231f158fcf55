"""Fused Adam step on CPU: update and apply in one pass over memory (experimental)."""

import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_snr.common.moments import correction, debias
from optax_snr.optimizers.adam import adam
from optax_snr.storage.quantized import QuantizedMoment, block_layout

__all__ = ["FusedAdam", "build_fused_kernel", "fused_adam"]

_SOURCE = pathlib.Path(__file__).with_name("fused_adam.cc")
_TARGET = "optax_snr_fused_adam"
_SYMBOL = "OptaxSnrFusedAdam"
_QUANTIZED_TARGET = "optax_snr_fused_adam_quantized"
_QUANTIZED_SYMBOL = "OptaxSnrFusedAdamQuantized"
_LEAVES_PER_CALL = 64
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17")


class FusedAdam(NamedTuple):
    """Adam with a fused step: ``init`` and ``update`` of the chain, plus ``step``.

    ``init`` and ``update`` are those of :func:`optax_snr.adam` (the readable
    reference chain), so ``FusedAdam`` can be used wherever an Optax
    transformation is expected. ``step(params, state, grads)`` returns
    ``(new_params, new_state)``: the same values as ``update`` followed by
    :func:`optax.apply_updates`, computed in one pass over memory. Its
    arguments come in the order of its results, so that
    ``jax.jit(opt.step, donate_argnums=(0, 1))`` updates each buffer in place.
    """

    init: Callable[..., Any]
    update: Callable[..., Any]
    step: Callable[..., tuple[Any, Any]]


# The kernel's cache: one shared library per key, and next to it a record of
# its size and SHA-256 written once the library has been built and loaded.
# A library is loaded only if it matches its record: a truncated library can
# kill the process when it is mapped (SIGBUS), so it must never reach dlopen.


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("OPTAX_SNR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "optax_snr"
    )
    return pathlib.Path(root)


def _cpu_id() -> str:
    """What ``-march=native`` depends on: a cached build must not move to another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def _compiler() -> list[str]:
    """The compiler command: ``$CXX`` (a command with arguments, e.g. ``ccache g++``)."""
    command = shlex.split(os.environ.get("CXX", ""))
    if not command:
        found = shutil.which("c++") or shutil.which("g++")
        command = [found] if found else []
    if not command:
        raise RuntimeError(
            "building the fused Adam kernel failed: no C++17 compiler found (set CXX). "
            "optax_snr.adam computes the same step without one."
        )
    return command


def _library_path(compiler: list[str]) -> pathlib.Path:
    key = hashlib.sha256(
        _SOURCE.read_bytes()
        + repr((_FLAGS, jax.__version__, compiler, sys.platform, _cpu_id())).encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"fused_adam_{key}.so"


def _record_path(library: pathlib.Path) -> pathlib.Path:
    return library.with_name(library.name + ".json")


def _digest(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _is_intact(library: pathlib.Path) -> bool:
    """Whether ``library`` is the file recorded after its build (size and hash)."""
    try:
        record = json.loads(_record_path(library).read_text())
        data = library.read_bytes()
    except (OSError, ValueError):
        return False
    return len(data) > 0 and record == _digest(data)


def _open(library: pathlib.Path) -> ctypes.CDLL:
    """dlopen (all symbols resolved now) and find the handler; OSError if either fails."""
    handle = ctypes.CDLL(str(library))
    for symbol in (_SYMBOL, _QUANTIZED_SYMBOL):
        try:
            getattr(handle, symbol)
        except AttributeError as e:
            raise OSError(f"{library} has no symbol {symbol}") from e
    return handle


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _build(compiler: list[str], target: pathlib.Path) -> ctypes.CDLL:
    """Compiles the kernel into ``target``, checks that it loads, records it; returns it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a temporary file and rename it: concurrent builds never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [*compiler, *_FLAGS, "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    command += [str(_SOURCE), "-o", tmp, "-lpthread"]
    name = shlex.join(compiler)
    try:
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as e:  # The compiler could not be started.
            raise RuntimeError(f"building the fused Adam kernel failed ({name}): {e}") from e
        if result.returncode != 0:
            raise RuntimeError(
                f"building the fused Adam kernel failed ({name}):\n{result.stderr[-2000:]}"
            )
        data = pathlib.Path(tmp).read_bytes()
        if not data:
            raise RuntimeError(
                f"building the fused Adam kernel failed: {name} exited without error but wrote "
                "no library. Set CXX to a C++17 compiler such as g++ or clang++."
            )
        try:
            handle = _open(pathlib.Path(tmp))
        except OSError as e:
            raise RuntimeError(
                f"building the fused Adam kernel failed: the library that {name} wrote does "
                f"not load ({e}). A C compiler such as gcc does not link the C++ runtime; "
                "set CXX to a C++17 compiler such as g++ or clang++."
            ) from e
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_atomically(_record_path(target), json.dumps(_digest(data)).encode())
    return handle


def _open_kernel() -> tuple[pathlib.Path, ctypes.CDLL]:
    """The cached kernel if it is intact and loads; otherwise a fresh build."""
    compiler = _compiler()
    if shutil.which(compiler[0]) is None:
        raise RuntimeError(
            f"building the fused Adam kernel failed: compiler {compiler[0]!r} not found "
            f"(CXX={os.environ.get('CXX', '')!r}). optax_snr.adam needs no compiler."
        )
    target = _library_path(compiler)
    if _is_intact(target):
        try:
            return target, _open(target)
        except OSError:
            pass  # Recorded but unloadable (say, a runtime library changed): rebuild.
    return target, _build(compiler, target)


@functools.cache
def _kernel() -> tuple[pathlib.Path, ctypes.CDLL]:
    return _open_kernel()


def build_fused_kernel() -> pathlib.Path:
    """Compiles the C++ kernel once per source, flags, compiler, jax version and CPU.

    The shared library is cached under ``$OPTAX_SNR_CACHE`` (default
    ``$XDG_CACHE_HOME/optax_snr``, else ``~/.cache/optax_snr``), keyed by the
    source, compiler flags, compiler command, jax version and CPU (it is built
    with ``-march=native``). It needs a C++17 compiler (``$CXX``, which may be a
    command with arguments such as ``ccache g++``; else ``c++`` or ``g++``) and
    the XLA FFI headers shipped with ``jaxlib``.

    After a build the library is loaded once (which resolves all its symbols)
    and its size and SHA-256 are recorded next to it. A cached library is
    loaded only if it matches that record, and is rebuilt if it does not (a
    truncated, emptied or overwritten file) or if it fails to load.

    Returns:
      The path of the cached library.

    Raises:
      RuntimeError: if no compiler is found, the compilation fails, or the
        compiler writes no library or one that does not load (for example
        ``CXX=gcc``, which does not link the C++ runtime). Nothing is cached
        then.
    """
    return _kernel()[0]


@functools.cache
def _register() -> None:
    handle = _kernel()[1]
    for target, symbol in ((_TARGET, _SYMBOL), (_QUANTIZED_TARGET, _QUANTIZED_SYMBOL)):
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu"
        )


def _describe(state: Any) -> str:
    """A state's outer types: ``SkipNonfiniteState`` or ``(ScaleByAdamState, EmptyState)``."""
    if type(state) in (tuple, list):
        return "(" + ", ".join(type(s).__name__ for s in state) + ")"
    return type(state).__name__


def _check_trees(params: Any, state: Any, grads: Any, expected: Any) -> None:
    """Clear errors for a foreign state, and for shapes that differ, naming the leaf."""
    if jax.tree.structure(state) != jax.tree.structure(expected):
        raise TypeError(
            "fused_adam.step: state must be the one that init(params) of this optimizer "
            f"returns, {_describe(expected)}; got {_describe(state)} whose tree differs. "
            "A wrapper's state (skip_nonfinite, MultiSteps, ...) cannot go to step: a "
            "wrapped optimizer steps with its update and optax.apply_updates."
        )
    for (path, leaf), want in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected), strict=True
    ):
        if np.shape(leaf) != want.shape:
            raise ValueError(
                f"fused_adam.step: state leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(leaf)}, but params give {want.shape}: the state was built from "
                "other params."
            )
    is_none = lambda x: x is None
    g = dict(jax.tree_util.tree_flatten_with_path(grads, is_leaf=is_none)[0])
    p = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0])
    if g.keys() != p.keys():
        only_g = ", ".join(jax.tree_util.keystr(k) for k in g if k not in p) or "nothing"
        only_p = ", ".join(jax.tree_util.keystr(k) for k in p if k not in g) or "nothing"
        raise ValueError(
            "fused_adam.step: grads and params have different trees. Only in grads: "
            f"{only_g}; only in params: {only_p}."
        )
    for path, leaf in g.items():
        if leaf is not None and np.shape(leaf) != np.shape(p[path]):
            raise ValueError(
                f"fused_adam.step: grads leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(leaf)} but the param has {np.shape(p[path])}."
            )


def _schedule_state(state: Any) -> Any:
    """The ``ScaleByScheduleState`` that a schedule's learning rate keeps in ``state``."""
    is_clock = lambda x: type(x).__name__ == "ScaleByScheduleState"
    (clock,) = [x for x in jax.tree.leaves(state, is_leaf=is_clock) if is_clock(x)]
    return clock


def _not_a_clock(path: Any, _: Any) -> bool:
    return getattr(path[-1], "tuple_name", None) != "ScaleByScheduleState"


def _is_float32(*arrays: Any) -> bool:
    return all(getattr(a, "dtype", None) == jnp.float32 for a in arrays)


def _same_blocks(m: Any, v: Any) -> bool:
    """Whether the kernel steps these moments: both quantized, in the same blocks."""
    return (
        isinstance(m, QuantizedMoment)
        and isinstance(v, QuantizedMoment)
        and block_layout(m) == block_layout(v)
    )


def fused_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> FusedAdam:
    r"""Adam whose ``step`` updates params and moments in one pass (CPU, experimental).

    The same optimizer as :func:`optax_snr.adam` (same arguments, same state),
    with a ``step`` that also applies the update. An Adam step is memory-bound;
    compiled by XLA:CPU, the reference chain plus :func:`optax.apply_updates`
    runs as three single-output loops per leaf (signal, noise, then the
    parameter, which reads both back) and moves 40 bytes per float32 parameter.
    ``step`` hands the float32 leaves to a C++ kernel (through ``jax.ffi``, one
    call per 64 leaves) that reads params, gradients and both moments once and
    writes params and moments once, in place: 28 bytes per parameter, the
    minimum (see ``benchmarks/README.md`` for its speed against
    :func:`optax.adam`).

    Jit it as ``jax.jit(opt.step, donate_argnums=(0, 1))``. ``step`` takes
    ``(params, state, grads)`` and returns ``(params, state)``, in the same
    order, because JAX pairs donated inputs with outputs of the same shape in
    order: so each donated buffer becomes its own output and the kernel
    updates it in place. (Arguments in another order make the buffers rotate,
    and XLA inserts a full-size copy for each.)

    .. math::

        w_t = w_{t-1} - \alpha \, \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    The kernel performs the float operations of XLA's compiled reference step
    (including the fused multiply-adds XLA emits on CPUs with FMA), so the
    results match ``update`` + ``apply_updates`` under ``jax.jit`` bit for bit
    in most leaves and within float32 rounding in all (XLA simplifies some
    trees slightly differently; measured differences were below 1e-7).

    **8- and 4-bit moments.** With ``mu_dtype`` and ``nu_dtype`` both
    :func:`optax_snr.quantized` (8 or 4 bits each, the same ``block_size``), a
    second kernel steps each quantized leaf block by block: it decodes the old
    codes, steps at full precision, and writes the new codes and scales in
    place, so no float32 moment of the leaf exists in memory at any time. At 8
    bits it moves 16 bytes per parameter instead of 28. Its codes and scales
    are those of the chain bit for bit (the same float operations), and the
    params agree within float32 rounding. This is the form that makes the
    saved state show up as a smaller peak: see ``benchmarks/README.md``.

    Leaves the kernels do not handle take the reference path inside the same
    ``step``: non-float32 params or gradients, moments in other dtypes or
    formats (or quantized in different blocks), ``nesterov=True``, and every
    leaf on a non-CPU backend. ``None`` gradients leave their param and
    moments unchanged, as in the chain. (``step`` runs the chain on every leaf
    and lets the kernel replace its results; under ``jax.jit`` XLA drops the
    chain's unused work, so call ``step`` jitted.)

    The kernel is compiled with the system C++ compiler on first use and cached
    (see :func:`build_fused_kernel`). It is an opaque custom call: ``step``
    cannot be differentiated; under :func:`jax.vmap` it runs the kernel once
    per batch element, in a loop; and under ``jax.jit`` with sharded
    params XLA gathers the kernel's operands (correct, but the results come
    back replicated); call ``step`` inside :func:`jax.shard_map` to update
    each shard of float32 moments where it lives (stored moments record their
    leaf's global shape, so quantized ones cannot go into ``shard_map``).

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format of the first-moment buffer (see
        :func:`optax_snr.adam`); ``None`` keeps params'.
      nesterov: whether to use the look-ahead (Nadam) signal.
      nu_dtype: dtype or storage format of the second-moment buffer; ``None``
        keeps params'.

    Returns:
      A :class:`FusedAdam` ``(init, update, step)``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> opt = optax_snr.fused_adam(learning_rate=0.1)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = opt.init(params)
      >>> step = jax.jit(opt.step, donate_argnums=(0, 1))
      >>> for _ in range(100):
      ...   params, state = step(params, state, jax.grad(f)(params))
      >>> bool(f(params) < 0.01)
      True

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    tx = adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype)
    lr_stage = optax.scale_by_learning_rate(learning_rate)

    def step(params, state, grads):
        _check_trees(params, state, grads, jax.eval_shape(tx.init, params))
        is_none = lambda x: x is None
        g_leaves, treedef = jax.tree.flatten(grads, is_leaf=is_none)
        p_leaves = treedef.flatten_up_to(params)
        # The moments are found by name: mu and nu wherever adam's state keeps them.
        m_leaves = treedef.flatten_up_to(optax.tree.get(state, "mu"))
        v_leaves = treedef.flatten_up_to(optax.tree.get(state, "nu"))
        use_kernel = not nesterov and jax.default_backend() == "cpu"
        fast = [
            use_kernel and g is not None and _is_float32(p, g, m, v)
            for p, g, m, v in zip(p_leaves, g_leaves, m_leaves, v_leaves, strict=True)
        ]
        quantized = [
            use_kernel and g is not None and _is_float32(p, g) and _same_blocks(m, v)
            for p, g, m, v in zip(p_leaves, g_leaves, m_leaves, v_leaves, strict=True)
        ]
        # The reference chain steps every leaf and the counters; the kernel then
        # replaces the kernel's leaves. Under jit XLA drops the chain's work on
        # those leaves, whose results are never used (a test counts the loops).
        updates, new_state = tx.update(grads, state, params)
        new_params = jax.tree.map(
            lambda p, u: p if u is None else optax.apply_updates(p, u),
            params,
            updates,
            is_leaf=is_none,
        )
        if not any(fast) and not any(quantized):
            return new_params, new_state

        _register()
        count = optax.tree.get(new_state, "count", filtering=_not_a_clock)  # Adam's step t.
        one = jnp.ones([], jnp.float32)
        lr_state = _schedule_state(state) if callable(learning_rate) else optax.EmptyState()
        neg_lr, _ = lr_stage.update(one, lr_state)  # -learning_rate at this step.
        scalars = jnp.stack(
            [
                jnp.asarray(1 - b1, jnp.float32),
                jnp.asarray(b1, jnp.float32),
                jnp.asarray(1 - b2, jnp.float32),
                jnp.asarray(b2, jnp.float32),
                debias(one, correction(b1, count)),  # XLA's m / c1 is m * (1 / c1).
                debias(one, correction(b2, count)),
                jnp.asarray(eps_root, jnp.float32),
                jnp.asarray(eps, jnp.float32),
                jnp.asarray(neg_lr, jnp.float32),
            ]
        )
        p_new = treedef.flatten_up_to(new_params)
        m_new = treedef.flatten_up_to(optax.tree.get(new_state, "mu"))
        v_new = treedef.flatten_up_to(optax.tree.get(new_state, "nu"))
        # XLA's compile time grows faster than linearly in one custom call's
        # aliased operands, so the leaves go in groups (one call per group).
        index = [i for i, f in enumerate(fast) if f]
        for start in range(0, len(index), _LEAVES_PER_CALL):
            group = index[start : start + _LEAVES_PER_CALL]
            operands, results, aliases = [scalars], [], {}
            for k, i in enumerate(group):
                operands += [p_leaves[i], g_leaves[i], m_leaves[i], v_leaves[i]]
                results += [jax.ShapeDtypeStruct(p_leaves[i].shape, jnp.float32)] * 3
                aliases.update({1 + 4 * k: 3 * k, 3 + 4 * k: 3 * k + 1, 4 + 4 * k: 3 * k + 2})
            # Under vmap the kernel runs once per batch element ("sequential").
            kernel = jax.ffi.ffi_call(
                _TARGET, results, input_output_aliases=aliases, vmap_method="sequential"
            )
            out = kernel(*operands)
            for k, i in enumerate(group):
                p_new[i], m_new[i], v_new[i] = out[3 * k], out[3 * k + 1], out[3 * k + 2]
        index = [i for i, q in enumerate(quantized) if q]
        for start in range(0, len(index), _LEAVES_PER_CALL):
            group = index[start : start + _LEAVES_PER_CALL]
            operands, results, aliases, layout = [scalars], [], {}, []
            for k, i in enumerate(group):
                m, v = m_leaves[i], v_leaves[i]
                arrays = [p_leaves[i], m.codes, m.scales, v.codes, v.scales]
                operands += [p_leaves[i], g_leaves[i], *arrays[1:]]
                results += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
                # Operand 1 + 6k + j (p, then skipping g, the codes and scales) is result 5k + j.
                aliases.update({1 + 6 * k + j + (j > 0): 5 * k + j for j in range(5)})
                layout += [*block_layout(m), m.format.bits, v.format.bits]
            kernel = jax.ffi.ffi_call(
                _QUANTIZED_TARGET, results, input_output_aliases=aliases, vmap_method="sequential"
            )
            out = kernel(*operands, layout=np.asarray(layout, np.int64))
            for k, i in enumerate(group):
                p_new[i], mc, ms, vc, vs = out[5 * k : 5 * k + 5]
                m_new[i] = dataclasses.replace(m_leaves[i], codes=mc, scales=ms)
                v_new[i] = dataclasses.replace(v_leaves[i], codes=vc, scales=vs)
        new_state = optax.tree.set(
            new_state, mu=treedef.unflatten(m_new), nu=treedef.unflatten(v_new)
        )
        return treedef.unflatten(p_new), new_state

    return FusedAdam(tx.init, tx.update, step)
