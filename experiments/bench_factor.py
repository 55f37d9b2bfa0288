"""Benchmark: the W blocks' majoriser inverse, `fenchel.solvers.cholesky_inverse`, by the side of its triangular solve.

A kernel_mm W block forms S⁻¹ = L⁻ᵀL⁻¹ once per solve, from the Cholesky factor L of its N × N majoriser
(N the batch), and a primal_mm block does the same for its (n_in + 1)² one. `cholesky_inverse` gets L⁻¹ from the
right-side solve XLᵀ = I (X = L⁻ᵀ); the left-side solve LX = I is the same matrix. This times both, each with the
factor and with the product L⁻ᵀL⁻¹, their calls alternating (`experiments.bench.timed_alternating`), for SPD
matrices of the sizes the MNIST networks meet, and checks that they agree.

Then `fenchel.solvers.spd_solver`'s two routes for applying M⁻¹ (N = the first size) `applications` times to
N × `columns` right-hand sides, each call's result fed to the next: triangular solves with the factor per
application, or M⁻¹ formed once and one product per application. The solver takes the first when
columns · applications < N; the table shows where the two costs cross.

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
from fenchel.solvers import _equilibrated_cholesky, cholesky_inverse, spd_solver


def left_side_inverse(m: jax.Array) -> jax.Array:
    """L⁻¹ from the left-side solve LX = I, with `cholesky_inverse`'s equilibration (the form it replaced)."""
    chol, d = _equilibrated_cholesky(m, 0.0)
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
    p.add_argument("--rhs-grid", default="10/1,50/1,100/1,300/1,30/2,50/2,80/2,10/3,30/3,50/3",
                   help="columns/applications pairs of the spd_solver comparison, comma-separated")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    try:
        grid = [tuple(int(v) for v in pair.split("/")) for pair in args.rhs_grid.split(",")] if args.rhs_grid else []
    except ValueError:
        p.error(f"--rhs-grid {args.rhs_grid!r}: expected columns/applications pairs like 10/1,30/3")
    if not sizes or min(sizes) < 1 or args.reps < 1 or args.calls < 1 or any(len(g) != 2 or min(g) < 1 for g in grid):
        p.error("--sizes, --reps, --calls and every --rhs-grid entry must be positive")

    def repeated(fn):
        def run(*fn_args):
            for _ in range(args.calls):
                out = fn(*fn_args)
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
    if grid:
        _rhs_table(spd_matrix(sizes[0]), grid, args.reps, args.calls, repeated)


def _applied(m, columns: int, applications: int, by_solves: bool):
    """Jitted R ↦ M⁻¹(…M⁻¹(M⁻¹R)) (`applications` times) by the route named: spd_solver's rule is steered by the
    counts it is given (0 right-hand sides: the solves; N² of them: the formed inverse)."""
    n = m.shape[0]

    def run(a, r):
        solve = spd_solver(a, 0 if by_solves else n, 0 if by_solves else n)
        for _ in range(applications):
            r = solve(r)
        return r

    return jax.jit(run)


def _rhs_table(m, grid, reps: int, calls: int, repeated) -> None:
    n = m.shape[0]
    print(f"\nspd_solver's routes, N = {n}: median µs per call (factor included) over {reps} rounds")
    print("| columns | applications | triangular solves | formed inverse | solves / inverse | rule takes |")
    print("|---|---|---|---|---|---|")
    for columns, applications in grid:
        r = jax.random.normal(jax.random.PRNGKey(1), (n, columns), jnp.float32)
        routes = {by: _applied(m, columns, applications, by) for by in (True, False)}
        a, b = (np.asarray(routes[by](m, r), np.float64) for by in (True, False))
        if not np.max(np.abs(a - b)) <= 1e-3 * np.max(np.abs(b)):
            raise AssertionError(f"{columns}/{applications}: the two routes differ by {np.max(np.abs(a - b)):.2e}")
        times = timed_alternating({by: (repeated(fn), (m, r)) for by, fn in routes.items()}, reps=reps)
        us = {by: 1e6 * t["median_s"] / calls for by, t in times.items()}
        taken = {e.primitive.name for e in jax.make_jaxpr(spd_solver(m, columns, applications))(r).jaxpr.eqns}
        rule = "solves" if "triangular_solve" in taken else "inverse"
        print(f"| {columns} | {applications} | {us[True]:.1f} | {us[False]:.1f} | {us[True] / us[False]:.2f} | "
              f"{rule} |", flush=True)


if __name__ == "__main__":
    main()
