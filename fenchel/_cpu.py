"""Process-wide CPU settings, each unless the user chose otherwise (imported first by `fenchel`).

One OpenBLAS thread. jax's CPU linear algebra (Cholesky, triangular solves, eigh: once per W block in every
lifted step) runs in scipy's OpenBLAS, whose own worker threads then compete with XLA's for the cores. On the
2-core CPU the lifted MNIST minibatch step took 4.05 ms with one OpenBLAS thread and 4.78 ms with two, in
alternating processes (`python -m experiments.bench_blas`; docs/benchmarks.md, "BLAS threads"). OpenBLAS reads
OPENBLAS_NUM_THREADS when it loads, at jax's first LAPACK call or at scipy.linalg's import, so this runs before
either when fenchel is imported first; a value the user set is kept.

XLA:CPU's copy insertion with region-based live-range analysis (`--xla_cpu_copy_insertion_use_region_analysis`,
the analysis XLA's GPU compiler can opt into). It proves that a `while_loop` body may update its loop-carried
arrays in place, where the default analysis copies them (FISTA's iterates) every iteration: the default
784-300-10 lifted step takes 7–9% less time on the 2-core CPU, with bit-identical results, and Adam's step is
unchanged (docs/benchmarks.md, "Loop copies"). XLA reads XLA_FLAGS when jax first creates its backends, so the
flag is appended only if that has not happened yet; a setting of the flag in XLA_FLAGS is kept (set it to false
to opt out). XLA aborts on a flag it does not know, so it is added only for the jaxlib versions it was checked
on (`CHECKED_JAXLIB`). The variable is inherited by child processes, like OPENBLAS_NUM_THREADS. (A per-program
`jax.jit(..., compiler_options=...)` cannot do this: jax refuses compiler options on a nested jit, and the
trainers' jitted steps are nested in the launcher's.)
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REGION_ANALYSIS_FLAG = "--xla_cpu_copy_insertion_use_region_analysis"
CHECKED_JAXLIB = ("0.10.",)  # versions whose XLA has the flag (requirements.txt pins 0.10.2)


def _add_region_analysis_flag() -> bool:
    import jaxlib
    from jax._src import xla_bridge

    if REGION_ANALYSIS_FLAG in os.environ.get("XLA_FLAGS", "") or xla_bridge.backends_are_initialized():
        return False
    if not jaxlib.__version__.startswith(CHECKED_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {REGION_ANALYSIS_FLAG}=true".strip()
    return True


_add_region_analysis_flag()
