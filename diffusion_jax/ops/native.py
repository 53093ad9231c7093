"""Native XLA:CPU kernels from `cpu_kernels.cc`: oneDNN primitives and hand-written C++ loops.

`cpu_kernels.cc` (next to this file) holds XLA FFI handlers for the three
passes of a 2-D convolution (oneDNN primitives, NHWC x HWIO, float32),
GroupNorm's forward and backward passes, dense layers (oneDNN matmuls),
multi-head self-attention (oneDNN matmuls around a vectorised softmax, one
image per thread), the DiT's adaptive LayerNorm, the tanh GELU and the
backward pass of its gated residuals. `available()` compiles it (once, outside
any trace: `diffusion_jax.ops.prepare()` or ``python -m diffusion_jax.ops build``)
with the system C++ compiler against

* oneDNN's library and headers from the ``cpu`` extra
  (``pip install 'diffusion_jax[cpu]'``: the ``onednn-cpu-gomp`` and
  ``onednn-devel-cpu-gomp`` wheels, which put ``libdnnl.so`` under
  ``<prefix>/lib`` and the headers under ``<prefix>/include``), and
* the XLA FFI headers that jaxlib ships (`jax.ffi.include_dir`),

caches the shared library under ``$DIFFUSION_JAX_CACHE`` (default
``~/.cache/diffusion_jax``; the file name hashes the source, the compiler
command, the jaxlib version and this CPU's model and flags; written to a
temporary name, fsynced and renamed, so a crash never leaves a half-written library
behind) with its SHA-256 recorded beside it (``<name>.sha256``, written the same way)
and verified before every load: a library that does not match its record (truncated,
altered, or without a record) is rebuilt, never loaded, since loading a truncated
library kills the process (SIGBUS inside the loader). It then registers the handlers
with `jax.ffi.register_ffi_target` for the CPU platform.

Loading a library runs its code in this process, so the cache is trusted only
when it is ours: the folder is created 0700, and a folder or library not
owned by this user, or writable by group or others, is refused (pure-XLA
fallback, one log line). A cached library that fails to load (e.g.
truncated) is rebuilt once; the compiler runs under a timeout
(``$DIFFUSION_JAX_COMPILE_TIMEOUT`` seconds, default 900).

`available()` says whether this worked; when it did not (no compiler, no
oneDNN, a non-x86 host), `reason()` says why, and `diffusion_jax.ops` falls
back to its pure-XLA implementations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import stat
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_TARGETS = {
    "dj_conv2d_forward": "DjConv2dForward",
    "dj_conv2d_backward_data": "DjConv2dBackwardData",
    "dj_conv2d_backward_weights": "DjConv2dBackwardWeights",
    "dj_group_norm_forward": "DjGroupNormForward",
    "dj_group_norm_backward": "DjGroupNormBackward",
    "dj_dense_forward": "DjDenseForward",
    "dj_dense_backward": "DjDenseBackward",
    "dj_attention_forward": "DjAttentionForward",
    "dj_attention_backward": "DjAttentionBackward",
    "dj_adaln_forward": "DjAdaLNForward",
    "dj_adaln_backward": "DjAdaLNBackward",
    "dj_gelu_forward": "DjGeluForward",
    "dj_gelu_backward": "DjGeluBackward",
    "dj_gated_residual_backward": "DjGatedResidualBackward",
}
CACHE_ENV_VAR = "DIFFUSION_JAX_CACHE"
COMPILE_TIMEOUT_ENV_VAR = "DIFFUSION_JAX_COMPILE_TIMEOUT"
_log = logging.getLogger(__name__)


class UnsafeCacheError(RuntimeError):
    """The cache folder or a cached library could be written by someone else."""


def _prefixes() -> list[Path]:
    """Where pip puts a wheel's data files (``lib/``, ``include/``): the env, the user base."""
    roots = [os.environ.get("DNNL_ROOT"), sys.prefix, sys.base_prefix, site.USER_BASE]
    return [Path(r) for r in roots if r]


def _find_onednn() -> tuple[Path, Path]:
    for prefix in _prefixes():
        lib, inc = prefix / "lib", prefix / "include"
        if (lib / "libdnnl.so.3").exists() and (inc / "oneapi" / "dnnl" / "dnnl.hpp").exists():
            return lib, inc
    raise RuntimeError(
        "oneDNN not found (looked for lib/libdnnl.so.3 and include/oneapi/dnnl/dnnl.hpp under "
        f"{[str(p) for p in _prefixes()]}); install it with: pip install 'diffusion_jax[cpu]' "
        "or set DNNL_ROOT"
    )


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "diffusion_jax")


def _check_owned(path: Path) -> None:
    """UnsafeCacheError unless `path` is owned by this user and not group/other-writable."""
    st = path.lstat()
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif st.st_uid != os.getuid():
        why = f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise UnsafeCacheError(
            f"native-kernel cache {path} {why}: not loading code from it; fix: chmod 700 it "
            f"(0755 for a library) or point ${CACHE_ENV_VAR} at a folder of your own")


def _safe_cache_dir() -> Path:
    """The cache folder, created 0700 if missing; UnsafeCacheError if others could write it."""
    path = _cache_dir()
    if not path.exists():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
    _check_owned(path)
    return path


def _cpu_signature() -> str:
    """Model and flags of this CPU (the library is built with -march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(rebuild: bool = False) -> Path:
    if sys.platform != "linux":
        raise RuntimeError(f"native kernels are built on Linux only, this is {sys.platform}")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    lib_dir, inc_dir = _find_onednn()
    cmd = [
        compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
        "-w", f"-I{jax.ffi.include_dir()}", f"-I{inc_dir}", str(_SOURCE),
        f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-l:libdnnl.so.3",
    ]  # fmt: skip
    import jaxlib

    key = hashlib.sha256(
        "\0".join([_SOURCE.read_text(), *cmd, jaxlib.__version__, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    out = _safe_cache_dir() / f"cpu_kernels-{key}.so"
    record = _record(out)
    if out.exists() and not rebuild:
        _check_owned(out)
        if _matches_record(out, record):
            return out
        _log.warning("cached native kernels %s do not match their recorded SHA-256 (%s): rebuilding them",
                     out, record.name)
    _write_atomically(out, lambda tmp: _compile(cmd, tmp), mode=0o755)
    # The record after the library: a library whose record is missing or stale is rebuilt.
    digest = _sha256(out)
    _write_atomically(record, lambda tmp: Path(tmp).write_text(digest + "\n"), mode=0o644)
    return out


def _record(library: Path) -> Path:
    """Where the SHA-256 of a cached library is recorded: <library>.sha256."""
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _matches_record(path: Path, record: Path) -> bool:
    """True when `record` is ours and holds the SHA-256 of `path`'s bytes."""
    if not record.exists():
        return False
    _check_owned(record)
    return record.read_text().strip() == _sha256(path)


def _write_atomically(path: Path, write, *, mode: int) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then fsynced, given `mode`
    and renamed over `path`, and the folder fsynced: readers see the old file or the whole
    new one, also after a crash or power loss."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _compile(cmd: list[str], out: str) -> None:
    timeout = float(os.environ.get(COMPILE_TIMEOUT_ENV_VAR) or 900)
    try:
        proc = subprocess.run([*cmd, "-o", out], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiling {_SOURCE.name} took over {timeout:g} s (${COMPILE_TIMEOUT_ENV_VAR})"
                           ) from None
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-4000:]}")


def _open_library() -> ctypes.CDLL:
    """The cached library, rebuilt once if the cached file does not load (truncated, ...)."""
    path = _build()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        _log.warning("cached native kernels %s do not load (%s): rebuilding them once", path, e)
    return ctypes.CDLL(str(_build(rebuild=True)))


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once; returns None on success, else the reason."""
    if os.environ.get("DIFFUSION_JAX_NATIVE", "1").strip() == "0":
        return "disabled by DIFFUSION_JAX_NATIVE=0"
    try:
        lib = _open_library()
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
    except UnsafeCacheError as e:
        _log.warning("native kernels unavailable, using the pure-XLA ops: %s", e)
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any failure means "fall back to XLA"
        return f"{type(e).__name__}: {e}"
    return None


def available() -> bool:
    """True when the native CPU kernels are built and registered (builds them on first call)."""
    return _load() is None


def reason() -> str | None:
    """Why the native kernels are unavailable (None when they are available)."""
    return _load()


def loaded() -> bool:
    """True when an earlier `available()` built and registered the kernels; never builds.

    The kernels test this while a function is traced, so a trace never starts a
    compiler: `diffusion_jax.ops.prepare()` (the trainer calls it before jit)
    or ``python -m diffusion_jax.ops build`` builds them beforehand.
    """
    return _load.cache_info().currsize > 0 and _load() is None


def usable(x, *operands) -> bool:
    """Whether a native kernel takes these arrays: all float32, the activation `x`
    non-empty, and the library built and registered (see `loaded`)."""
    return all(a.dtype == np.float32 for a in (x, *operands)) and x.size > 0 and loaded()


def _conv_call(target: str, a, b, out_shape, strides, pads):
    (pt, pb), (pl, pr) = pads
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(tuple(out_shape), np.float32), vmap_method="sequential"
    )(a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]),
      pt=np.int64(pt), pl=np.int64(pl), pb=np.int64(pb), pr=np.int64(pr))  # fmt: skip


def conv2d_forward(x, kernel, out_shape, strides, pads):
    """y = conv(x, kernel) by oneDNN; x NHWC, kernel HWIO, float32."""
    return _conv_call("dj_conv2d_forward", x, kernel, out_shape, strides, pads)


def conv2d_backward_data(dy, kernel, x_shape, strides, pads):
    """dL/dx of conv for output gradient dy."""
    return _conv_call("dj_conv2d_backward_data", dy, kernel, x_shape, strides, pads)


def conv2d_backward_weights(x, dy, kernel_shape, strides, pads):
    """dL/dkernel of conv for output gradient dy (HWIO)."""
    return _conv_call("dj_conv2d_backward_weights", x, dy, kernel_shape, strides, pads)


def group_norm_forward(x, scale, bias, num_groups, epsilon):
    """(y, mean[N, G], rstd[N, G]) of GroupNorm over NHWC float32 x."""
    n = x.shape[0]
    stats = jax.ShapeDtypeStruct((n, num_groups), np.float32)
    return jax.ffi.ffi_call(
        "dj_group_norm_forward",
        (jax.ShapeDtypeStruct(x.shape, np.float32), stats, stats),
        vmap_method="sequential",
    )(x, scale, bias, groups=np.int64(num_groups), eps=np.float32(epsilon))


def group_norm_backward(x, scale, mean, rstd, dy, num_groups):
    """(dx, dscale, dbias) of GroupNorm from the forward pass's mean and rstd."""
    c = x.shape[-1]
    vec = jax.ShapeDtypeStruct((c,), np.float32)
    return jax.ffi.ffi_call(
        "dj_group_norm_backward",
        (jax.ShapeDtypeStruct(x.shape, np.float32), vec, vec),
        vmap_method="sequential",
    )(x, scale, mean, rstd, dy, groups=np.int64(num_groups))


def dense_forward(x, kernel, bias):
    """x @ kernel + bias by one oneDNN matmul; x [M, K], kernel [K, N], bias [N], float32."""
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), np.float32)
    return jax.ffi.ffi_call("dj_dense_forward", out, vmap_method="sequential")(x, kernel, bias)


def dense_backward(x, kernel, dy):
    """(dx, dkernel, dbias) of y = x @ kernel + bias for x [M, K], kernel [K, N], dy [M, N]."""
    shapes = (x.shape, kernel.shape, kernel.shape[1:])
    return jax.ffi.ffi_call(
        "dj_dense_backward",
        tuple(jax.ShapeDtypeStruct(s, np.float32) for s in shapes),
        vmap_method="sequential",
    )(x, kernel, dy)


def attention_forward(qkv, heads, scale):
    """(o [B, L, H*D], lse [B, H, L]) of per-head softmax(scale q k^T) v, qkv [B, L, 3*H*D] float32."""
    b, l, c = qkv.shape
    return jax.ffi.ffi_call(
        "dj_attention_forward",
        (jax.ShapeDtypeStruct((b, l, c // 3), np.float32), jax.ShapeDtypeStruct((b, heads, l), np.float32)),
        vmap_method="sequential",
    )(qkv, heads=np.int64(heads), scale=np.float32(scale))


def attention_backward(qkv, o, lse, do, heads, scale):
    """dqkv of attention from the forward pass's output o and lse."""
    return jax.ffi.ffi_call(
        "dj_attention_backward", jax.ShapeDtypeStruct(qkv.shape, np.float32), vmap_method="sequential"
    )(qkv, o, lse, do, heads=np.int64(heads), scale=np.float32(scale))


def adaptive_layer_norm_forward(x, shift, scale, epsilon):
    """(y, mean [B, L], rstd [B, L]) of LN(x) (1 + scale) + shift over x [B, L, D] float32."""
    stats = jax.ShapeDtypeStruct(x.shape[:2], np.float32)
    return jax.ffi.ffi_call(
        "dj_adaln_forward", (jax.ShapeDtypeStruct(x.shape, np.float32), stats, stats),
        vmap_method="sequential",
    )(x, shift, scale, eps=np.float32(epsilon))


def adaptive_layer_norm_backward(x, scale, mean, rstd, dy):
    """(dx, dshift, dscale) of the adaptive LayerNorm from the forward pass's mean and rstd."""
    vec = jax.ShapeDtypeStruct(scale.shape, np.float32)
    return jax.ffi.ffi_call(
        "dj_adaln_backward", (jax.ShapeDtypeStruct(x.shape, np.float32), vec, vec),
        vmap_method="sequential",
    )(x, scale, mean, rstd, dy)


def gelu_forward(x):
    """tanh-approximate GELU of float32 x, elementwise."""
    return jax.ffi.ffi_call("dj_gelu_forward", jax.ShapeDtypeStruct(x.shape, np.float32),
                            vmap_method="broadcast_all")(x)


def gelu_backward(x, dy):
    """dL/dx of the tanh-approximate GELU for output gradient dy."""
    return jax.ffi.ffi_call("dj_gelu_backward", jax.ShapeDtypeStruct(x.shape, np.float32),
                            vmap_method="broadcast_all")(x, dy)


def gated_residual_backward(gate, h, dy):
    """(dh, dgate) of y = x + gate[:, None] * h for gate [B, D], h and dy [B, L, D], float32."""
    return jax.ffi.ffi_call(
        "dj_gated_residual_backward",
        (jax.ShapeDtypeStruct(h.shape, np.float32), jax.ShapeDtypeStruct(gate.shape, np.float32)),
        vmap_method="sequential",
    )(gate, h, dy)
