"""One OpenBLAS thread per call, unless the user chose otherwise (imported first by `fenchel`).

jax's CPU linear algebra (Cholesky, triangular solves, eigh: once per W block in every lifted step) runs in
scipy's OpenBLAS, whose own worker threads then compete with XLA's for the cores. On the 2-core CPU the lifted
MNIST minibatch step took 4.05 ms with one OpenBLAS thread and 4.78 ms with two, in alternating processes
(`python -m experiments.bench_blas`; docs/benchmarks.md, "BLAS threads"). OpenBLAS reads
OPENBLAS_NUM_THREADS when it loads, at jax's first LAPACK call or at scipy.linalg's import, so this runs before
either when fenchel is imported first; a value the user set is kept.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
