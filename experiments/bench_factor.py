"""Benchmark: the W blocks' majoriser inverse, `fenchel.solvers.cholesky_inverse`, by the side of its triangular solve.

A kernel_mm W block forms S⁻¹ = L⁻ᵀL⁻¹ once per solve, from the Cholesky factor L of its N × N majoriser
(N the batch), and a primal_mm block does the same for its (n_in + 1)² one. `cholesky_inverse` gets L⁻¹ from the
right-side solve XLᵀ = I (X = L⁻ᵀ); the left-side solve LX = I is the same matrix. This times both, each with the
factor and with the product L⁻ᵀL⁻¹, their calls alternating (`experiments.bench.timed_alternating`), for SPD
matrices of the sizes the MNIST networks meet, and checks that they agree.

    python -m experiments.bench_factor                    # N = 100, 300, 785; 21 rounds of 50 calls
    python -m experiments.bench_factor --sizes 100 --reps 41
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timed_alternating
from fenchel.solvers import cholesky_inverse


def left_side_inverse(m: jax.Array) -> jax.Array:
    """L⁻¹ from the left-side solve LX = I, with `cholesky_inverse`'s equilibration (the form it replaced)."""
    d = jnp.sqrt(jnp.diag(m))
    d = jnp.where(d > 0, d, 1.0)
    chol = jnp.linalg.cholesky(m / d[:, None] / d[None, :])
    return jax.scipy.linalg.solve_triangular(chol, jnp.eye(m.shape[0], dtype=m.dtype), lower=True) / d[None, :]


def _s_inverse(fn):
    """M ↦ L⁻ᵀL⁻¹ = M⁻¹ from a form of L⁻¹, jitted."""
    def inverse(m):
        l_inv = fn(m)
        return l_inv.T @ l_inv
    return jax.jit(inverse)


def spd_matrix(n: int, seed: int = 0) -> jax.Array:
    """AAᵀ/2n + I for a Gaussian n × 2n matrix A, float32."""
    a = jax.random.normal(jax.random.PRNGKey(seed), (n, 2 * n), jnp.float32)
    return a @ a.T / (2 * n) + jnp.eye(n, dtype=jnp.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,300,785", help="matrix sizes N, comma-separated")
    p.add_argument("--reps", type=int, default=21, help="alternating rounds; each times `--calls` calls")
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    if not sizes or min(sizes) < 1 or args.reps < 1 or args.calls < 1:
        p.error("--sizes, --reps and --calls must be positive")

    def repeated(fn):
        def run(m):
            for _ in range(args.calls):
                out = fn(m)
            return out
        return run

    forms = {"right (XLᵀ = I, current)": cholesky_inverse, "left (LX = I)": left_side_inverse}
    print(f"{jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}: median µs per call over {args.reps} rounds of "
          f"{args.calls} calls")
    print("| N | " + " | ".join(f"L⁻¹, {k}" for k in forms) + " | " + " | ".join(f"S⁻¹, {k}" for k in forms)
          + " | right / left (S⁻¹) |")
    print("|---|" + "---|" * (2 * len(forms) + 1))
    for n in sizes:
        m = spd_matrix(n)
        calls = {}
        for name, fn in forms.items():
            factor, inverse = jax.jit(fn), _s_inverse(fn)
            calls[("L", name)] = (repeated(factor), (m,))
            calls[("S", name)] = (repeated(inverse), (m,))
        ref = np.linalg.inv(np.asarray(m, np.float64))
        for name, fn in forms.items():
            err = np.max(np.abs(np.asarray(_s_inverse(fn)(m), np.float64) - ref))
            if not err <= 1e-4 * np.max(np.abs(ref)):
                raise AssertionError(f"N = {n}: the {name} form's S⁻¹ is off by {err:.2e}")
        times = timed_alternating(calls, reps=args.reps)
        us = {key: 1e6 * t["median_s"] / args.calls for key, t in times.items()}
        names = list(forms)
        print(f"| {n} | " + " | ".join(f"{us[('L', k)]:.1f}" for k in names) + " | "
              + " | ".join(f"{us[('S', k)]:.1f}" for k in names)
              + f" | {us[('S', names[0])] / us[('S', names[1])]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
