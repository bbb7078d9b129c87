"""Fused elementwise CPU kernels for the CPU fast path's glue (RMSNorm, SwiGLU), built on first use.

On the tiny default model the layer's matmuls and attention are ATen's, near the machine's peak;
what else a step costs is mostly the glue between them, run as chains of ATen ops that each
read and write the whole activation (SwiGLU: sigmoid, two multiplies forward, five passes
backward; RMSNorm: a reduction and a multiply forward, five passes backward) and each pay
ATen's per-op setup. Here each of those chains is one loop over the data, row by row for the
norms (a 64-float row stays in L1 between its reduction and its update).

The C source below is compiled once per machine with the system's gcc (``-O3 -march=native
-fopenmp``) into ``~/.cache/evo/kernels/`` (``EVO_CACHE_DIR`` moves it) and loaded with ctypes; the
loops are parallel with OpenMP over the same runtime (``libgomp.so.1``) and thread count torch
uses. Where there is no compiler, the build fails, or ``EVO_CPU_KERNELS=0``, trainers/cpu_fused.py
keeps its ATen ops; both paths are tested against each other.

Numerics: fp32 throughout; sigmoid uses a Cephes-style exp (max relative error ~2e-7), the norms
sum their squares in a different order than ATen's: results agree with the ATen path to fp32
rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define GRAIN 32768  /* elements below which a loop stays on one thread (ATen's grain size) */

static inline float exp_approx(float x) {
    /* e^x as 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes expf); branch-free, so it vectorises */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  /* (fminf / floorf would not vectorise) */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* a (n) -> a = silu(a), sig = sigmoid(a), h = silu(a) * b */
void swiglu_fwd(float *restrict a, const float *restrict b, float *restrict sig, float *restrict h, int64_t n,
                int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= GRAIN)
    for (int64_t c0 = 0; c0 < n; c0 += 8192) {
        int64_t c1 = c0 + 8192 < n ? c0 + 8192 : n;
        for (int64_t i = c0; i < c1; i++) {
            float x = a[i];
            float s = 1.0f / (1.0f + exp_approx(-x));
            float y = x * s;
            sig[i] = s;
            a[i] = y;
            h[i] = y * b[i];
        }
    }
}

/* gh (n, in h's buffer), s = silu(a), sig, b -> b = grad of a, gh = grad of b */
void swiglu_bwd(float *gh, const float *s, const float *sig, float *b, int64_t n, int nthreads) {
    #pragma omp parallel for simd schedule(static) num_threads(nthreads) if (n >= GRAIN)
    for (int64_t i = 0; i < n; i++) {
        float g = gh[i], y = s[i], sg = sig[i];
        b[i] = g * b[i] * (sg + y - y * sg);
        gh[i] = g * y;
    }
}

/* rows x (rows, c) -> xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) */
void rms_fwd(const float *x, float *xhat, float *rstd, int64_t rows, int64_t c, float eps, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * c >= GRAIN)
    for (int64_t i = 0; i < rows; i++) {
        const float *xi = x + i * c;
        float *oi = xhat + i * c;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < c; j++) ss += xi[j] * xi[j];
        float r = 1.0f / sqrtf(ss / (float)c + eps);
        rstd[i] = r;
        #pragma omp simd
        for (int64_t j = 0; j < c; j++) oi[j] = xi[j] * r;
    }
}

/* g (rows, c) = grad of xhat, in place -> grad of x: rstd * (g - xhat * mean(g * xhat)) (+ res) */
void rms_bwd(float *g, const float *xhat, const float *rstd, const float *res, int64_t rows, int64_t c,
             int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * c >= GRAIN)
    for (int64_t i = 0; i < rows; i++) {
        float *gi = g + i * c;
        const float *xi = xhat + i * c;
        float m = 0.0f;
        #pragma omp simd reduction(+:m)
        for (int64_t j = 0; j < c; j++) m += gi[j] * xi[j];
        m /= (float)c;
        float r = rstd[i];
        if (res) {
            const float *ri = res + i * c;
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) gi[j] = r * (gi[j] - xi[j] * m) + ri[j];
        } else {
            #pragma omp simd
            for (int64_t j = 0; j < c; j++) gi[j] = r * (gi[j] - xi[j] * m);
        }
    }
}
"""

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def _cache_dir() -> Path:
    root = os.environ.get("EVO_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "evo") / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the processor's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join(lines)


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join((SOURCE, " ".join(FLAGS), version, _cpu_key())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"evo_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
        src.write_text(SOURCE)
        done = subprocess.run([compiler, *FLAGS, "-x", "c", str(src), "-o", str(out), "-lm"],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise RuntimeError(f"{compiler} failed: {last}")
        os.replace(out, target)  # atomic: concurrent builders (population members) each write their own
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None where they are off or cannot be had
    (the reason is in ``why_not()``)."""
    global _lib, _tried, _why_not
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("EVO_CPU_KERNELS", "1") == "0":
                raise RuntimeError("EVO_CPU_KERNELS=0")
            if sys.platform != "linux":
                raise RuntimeError(f"built for Linux only (this is {sys.platform})")
            compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
            if compiler is None:
                raise RuntimeError("no C compiler (gcc) on PATH")
            lib = ctypes.CDLL(str(_build(compiler)))
            f32, i64 = ctypes.c_void_p, ctypes.c_int64
            i32 = ctypes.c_int
            lib.swiglu_fwd.argtypes = (f32, f32, f32, f32, i64, i32)
            lib.swiglu_bwd.argtypes = (f32, f32, f32, f32, i64, i32)
            lib.rms_fwd.argtypes = (f32, f32, f32, i64, i64, ctypes.c_float, i32)
            lib.rms_bwd.argtypes = (f32, f32, f32, f32, i64, i64, i32)
            for name in ("swiglu_fwd", "swiglu_bwd", "rms_fwd", "rms_bwd"):
                getattr(lib, name).restype = None
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _lib, _why_not = None, str(e)
            if _why_not != "EVO_CPU_KERNELS=0":
                logging.getLogger(__name__).warning(
                    "compiled CPU loops unavailable (%s); the CPU fast path uses ATen ops", _why_not)
        _tried = True
    return _lib


def why_not() -> str:
    """Why the kernels are not in use ('' when they are, or have not been asked for yet)."""
    return _why_not


def reset() -> None:
    """Forget the loaded state so the next library() looks again (tests switch EVO_CPU_KERNELS)."""
    global _lib, _tried, _why_not
    with _lock:
        _lib, _tried, _why_not = None, False, ""


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go to the kernels: fp32, CPU, contiguous (and the kernels exist)."""
    return (library() is not None
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors))


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor, sig: torch.Tensor, h: torch.Tensor) -> None:
    """In place: a = silu(a), sig = sigmoid(a), h = silu(a) * b (all the same shape)."""
    _lib.swiglu_fwd(a.data_ptr(), b.data_ptr(), sig.data_ptr(), h.data_ptr(), a.numel(), torch.get_num_threads())


def swiglu_bwd(gh: torch.Tensor, s: torch.Tensor, sig: torch.Tensor, b: torch.Tensor) -> None:
    """In place: b = gh * b * silu'(a) (the grad of a), gh = gh * silu(a) (the grad of b)."""
    _lib.swiglu_bwd(gh.data_ptr(), s.data_ptr(), sig.data_ptr(), b.data_ptr(), gh.numel(), torch.get_num_threads())


def rms_fwd(x: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, eps: float) -> None:
    """Rows of x (N, C): xhat = x * rstd, rstd (N, 1) = 1 / sqrt(mean(x^2) + eps)."""
    _lib.rms_fwd(x.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())


def rms_bwd(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, res: torch.Tensor | None) -> None:
    """In place in g (the grad of xhat, (N, C)): the grad of x, plus `res` (N, C) when given."""
    _lib.rms_bwd(g.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), None if res is None else res.data_ptr(),
                 g.shape[0], g.shape[1], torch.get_num_threads())
