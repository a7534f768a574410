"""The fused CPU kernel of the dense pair stage, compiled on first use.

``kernels/pair_stage_cpu.cc`` computes :func:`geonorm_jax.egnn.dense_edge_stage`
(with ``norm_diff`` and ``coords_tanh`` off) tile by tile, so that no
``[B, N, N, H]`` array reaches memory, as two XLA FFI handlers: the forward
pass and its gradient. It needs Linux on x86-64 with AVX-512 and a C++17
compiler (``$CXX``, else ``g++``). The first call compiles it, in about 5 s,
into a cache directory: ``$GEONORM_JAX_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/geonorm_jax``, else ``~/.cache/geonorm_jax``. The cached
library's name is a hash of the source, the compiler, the jax version and
the CPU's flags, so that it is not loaded on a CPU it was not built for.
Setting ``GEONORM_JAX_NO_CPU_KERNEL=1`` turns the kernel off.

:func:`unavailable_reason` returns why the kernel cannot run here, or None
when it can. Where it cannot, :class:`geonorm_jax.egnn.EGNN` takes its XLA
dense or segment path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("kernels") / "pair_stage_cpu.cc"
FORWARD_TARGET = "geonorm_pair_stage_forward"
BACKWARD_TARGET = "geonorm_pair_stage_backward"
MAX_EDGE_ATTRS = 7  # kernels/pair_stage_cpu.cc keeps [|x_i - x_j|^2, a_ij] in 8 floats per pair
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
DISABLE_VARIABLE = "GEONORM_JAX_NO_CPU_KERNEL"

logger = logging.getLogger(__name__)
_registered = False  # whether this process has registered the FFI targets


class KernelUnavailable(RuntimeError):
    """The fused CPU kernel cannot be built or loaded on this machine."""


def _cpu_flags() -> str:
    """Return the ``flags`` line of ``/proc/cpuinfo``, or "" where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    """Return the directory of compiled kernels."""
    configured = os.environ.get("GEONORM_JAX_KERNEL_CACHE")
    if configured:
        return Path(configured)
    # An empty XDG_CACHE_HOME counts as unset, so the cache never lands in the working directory.
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geonorm_jax"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _library_path(compiler: str, cpu_flags: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), jax.__version__.encode(), cpu_flags.encode()):
        key.update(part)
        key.update(b"\0")
    key.update(" ".join(COMPILE_FLAGS).encode())
    return cache_dir() / f"pair_stage_cpu-{key.hexdigest()[:16]}.so"


def _compile(compiler: str, library: Path) -> None:
    """Compile the kernel into ``library``, atomically, so that concurrent builds are safe."""
    library.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(descriptor)
    command = [compiler, *COMPILE_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", partial]
    logger.info("compiling the fused CPU pair kernel: %s", " ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(partial)
        raise KernelUnavailable(
            f"{compiler} failed to compile {SOURCE.name} (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    os.replace(partial, library)
    logger.info("compiled %s in %.1f s", library, time.perf_counter() - start)


@functools.cache
def _load() -> None:
    """Build (or find in the cache), load and register the kernel, or raise KernelUnavailable."""
    if os.environ.get(DISABLE_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        raise KernelUnavailable(f"{DISABLE_VARIABLE}={os.environ[DISABLE_VARIABLE]} turns it off")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"it needs Linux on x86-64, not {platform.system()} on {platform.machine()}")
    cpu_flags = _cpu_flags()
    if "avx512f" not in cpu_flags.split():
        raise KernelUnavailable("this CPU has no AVX-512 (avx512f in /proc/cpuinfo)")
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on PATH; install g++ or set CXX")
    library = _library_path(compiler, cpu_flags)
    if not library.exists():
        _compile(compiler, library)
    try:
        handle = ctypes.cdll.LoadLibrary(str(library))
    except OSError as error:
        raise KernelUnavailable(f"cannot load {library}: {error}; delete it to rebuild") from error
    global _registered
    if not _registered:  # XLA refuses a second registration of a name, even of the same code
        jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(handle.GeonormPairStageForward), platform="cpu")
        jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(handle.GeonormPairStageBackward), platform="cpu")
        _registered = True


@functools.cache
def unavailable_reason() -> str | None:
    """Return why the fused kernel cannot run on this machine, or None when it can.

    The first call builds the kernel if no cached build matches. A failure
    is logged once as a warning and remembered for the process.
    """
    try:
        _load()
    except KernelUnavailable as error:
        logger.warning("fused CPU pair kernel unavailable, so EGNN runs its XLA paths: %s", error)
        return str(error)
    return None


def _forward_call(weights, receiver_part, sender_part, x, edge_attr):
    b, n, hidden = receiver_part.shape
    out_types = (
        jax.ShapeDtypeStruct((b, n, hidden), jnp.float32),
        jax.ShapeDtypeStruct((b, n, 3), jnp.float32),
    )
    call = jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")
    return call(receiver_part, sender_part, x, edge_attr, *weights)


@jax.custom_vjp
def _pair_stage(weights, receiver_part, sender_part, x, edge_attr):
    return _forward_call(weights, receiver_part, sender_part, x, edge_attr)


def _pair_stage_forward(weights, receiver_part, sender_part, x, edge_attr):
    # Like the XLA version, only the node-size inputs are kept: the backward
    # kernel computes each tile's pair arrays once more.
    outputs = _forward_call(weights, receiver_part, sender_part, x, edge_attr)
    return outputs, (weights, receiver_part, sender_part, x, edge_attr)


def _pair_stage_backward(residuals, cotangents):
    weights, receiver_part, sender_part, x, edge_attr = residuals
    inputs = (receiver_part, sender_part, x, edge_attr, *weights)
    out_types = tuple(jax.ShapeDtypeStruct(value.shape, jnp.float32) for value in inputs)
    call = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")
    receiver_grad, sender_grad, x_grad, edge_attr_grad, *weights_grad = call(*inputs, *cotangents)
    return type(weights)(*weights_grad), receiver_grad, sender_grad, x_grad, edge_attr_grad


_pair_stage.defvjp(_pair_stage_forward, _pair_stage_backward)


def pair_stage(weights, receiver_part, sender_part, x, edge_attr):
    """Compute ``dense_edge_stage(..., norm_diff=False, coords_tanh=False)`` with the fused kernel.

    Same arguments and outputs as :func:`geonorm_jax.egnn.dense_edge_stage`
    (``weights`` a ``PairWeights``), all float32, ``H`` a multiple of 16
    and at most :data:`MAX_EDGE_ATTRS` edge attributes. Differentiable
    (``jax.custom_vjp``), jit-able, and vmapped as a loop. Raises
    KernelUnavailable where :func:`unavailable_reason` is not None.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise KernelUnavailable(f"the fused CPU pair kernel cannot run here: {reason}")
    hidden, attrs = receiver_part.shape[-1], edge_attr.shape[-1]
    if hidden % 16 or attrs > MAX_EDGE_ATTRS:
        raise ValueError(
            f"the fused pair kernel needs H a multiple of 16 and at most {MAX_EDGE_ATTRS} edge attributes, "
            f"got H={hidden} and {attrs}; use message_passing='dense'"
        )
    arrays = (weights, receiver_part, sender_part, x, edge_attr)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(arrays)}
    if dtypes != {jnp.dtype(jnp.float32)}:
        raise ValueError(f"the fused pair kernel computes in float32, got {sorted(map(str, dtypes))}; use message_passing='dense'")
    return _pair_stage(*arrays)
