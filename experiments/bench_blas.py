"""Benchmark: latency of the W blocks' LAPACK calls under the process's OpenBLAS thread count.

Every lifted W block factors its majoriser once per solve (`fenchel.solvers.cholesky_inverse`: a Cholesky factor
and a triangular solve, which jax runs in scipy's OpenBLAS on the CPU). This prints the median and the 90th
percentile of that call, jitted, for SPD matrices of the W blocks' sizes, and the OpenBLAS thread setting in force.
`import fenchel` sets OPENBLAS_NUM_THREADS=1 unless it is set already (`fenchel._blas`), so compare

    python -m experiments.bench_blas                            # one OpenBLAS thread (fenchel's default)
    OPENBLAS_NUM_THREADS=2 python -m experiments.bench_blas     # OpenBLAS's own default on a 2-core machine

The tail, not the median, is what a training epoch pays for: one slow call per W block per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fenchel.solvers import cholesky_inverse  # importing fenchel sets the OpenBLAS thread count, before any LAPACK call


def latency(n: int, calls: int) -> dict:
    """Median and 90th percentile (ms) of a jitted `cholesky_inverse` of an n×n SPD matrix, after a warm-up call."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, 8 * n), jnp.float32)
    m = a @ a.T / (8 * n) + jnp.eye(n, dtype=jnp.float32)
    fn = jax.jit(cholesky_inverse)
    jax.block_until_ready(fn(m))
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(m))
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * float(np.percentile(times, 90))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="26,100,151", help="matrix sizes: LeNet-5's conv1 and conv2 patch Gram "
                   "matrices (26, 151) and a minibatch of 100 (the dense kernel_mm blocks)")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args(argv)
    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, {os.cpu_count()} CPUs, "
          f"{jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}")
    print("| n | median ms | 90th percentile ms |")
    print("|---|---|---|")
    for n in (int(v) for v in args.sizes.split(",")):
        r = latency(n, args.calls)
        print(f"| {n} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
