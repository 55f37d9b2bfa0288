"""Benchmark: the lifted step under one OpenBLAS thread against OpenBLAS's default, in alternating processes.

Every lifted W block factors its majoriser once per solve (`fenchel.solvers.cholesky_inverse`: a Cholesky factor
and a triangular solve, which jax runs in scipy's OpenBLAS on the CPU). OpenBLAS's worker threads then compete
with XLA's for the cores. `import fenchel` therefore sets OPENBLAS_NUM_THREADS=1 unless it is set already
(`fenchel._cpu`). OpenBLAS reads the variable once, when it loads, so each setting runs in its own child process;
the settings alternate for --rounds rounds so that drift in the machine's speed hits both. Each child prints the
median time of one lifted minibatch step and one Adam step (MNIST 784-300-10, `configs/mnist_mlp.py`, batch 100,
cycling over 50 batches after 5 warm-up steps), and the median and 90th percentile of an isolated
`cholesky_inverse` of a 100×100 SPD matrix.

    python -m experiments.bench_blas                 # 1 thread against os.cpu_count() threads, 3 rounds
    python -m experiments.bench_blas --threads 1,4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fenchel.solvers import cholesky_inverse  # importing fenchel sets the OpenBLAS thread count, before any LAPACK call


def _latency_ms(fn, calls: int) -> tuple:
    """(median, 90th percentile) ms of fn() after a warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), 1e3 * float(np.percentile(times, 90))


def child(steps: int) -> dict:
    """The figures of one process, under the OpenBLAS thread count it was started with."""
    from configs import mnist_mlp
    from experiments.train import Job

    a = jax.random.normal(jax.random.PRNGKey(0), (100, 800), jnp.float32)
    m = a @ a.T / 800 + jnp.eye(100, dtype=jnp.float32)
    factor = jax.jit(cholesky_inverse)
    out = dict(zip(("factor_median_ms", "factor_p90_ms"), _latency_ms(lambda: factor(m), 200)))
    for trainer in ("fenchel", "adam"):
        config = mnist_mlp.get_config()
        config.update(dict(trainer=trainer, progress=False, test_size=100, train_size=5000))
        job = Job(config)
        step = jax.jit(job.trainer.step)
        batches = [(job.x_train[i * 100:(i + 1) * 100], job.y_train[i * 100:(i + 1) * 100]) for i in range(50)]
        state = job.trainer.init(job.params0)
        for x, y in batches[:5]:
            state = step(state, x, y)[0]
        jax.block_until_ready(state)
        times = []
        for i in range(steps):
            t = time.perf_counter()
            state = step(state, *batches[i % 50])[0]
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t)
        out[f"{trainer}_step_ms"] = 1e3 * statistics.median(times)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="OpenBLAS thread counts to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150, help="timed steps per trainer and process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return
    settings = [int(v) for v in args.threads.split(",")]
    runs = {n: [] for n in settings}
    for _ in range(args.rounds):
        for n in settings:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": str(n)}
            cmd = [sys.executable, "-m", "experiments.bench_blas", "--child", "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{os.cpu_count()} CPUs, {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d')}, {args.rounds} rounds "
          "(medians over rounds)")
    print("| OpenBLAS threads | lifted step ms | Adam step ms | lifted / Adam | 100×100 factor: median, 90th pct ms |")
    print("|---|---|---|---|---|")
    for n, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {n} | {med['fenchel_step_ms']:.2f} | {med['adam_step_ms']:.2f} | "
              f"{med['fenchel_step_ms'] / med['adam_step_ms']:.2f} | {med['factor_median_ms']:.3f}, "
              f"{med['factor_p90_ms']:.3f} |")
        print("  per round, lifted step ms: " + ", ".join(f"{r['fenchel_step_ms']:.2f}" for r in rs))


if __name__ == "__main__":
    main()
