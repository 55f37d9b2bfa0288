"""One OpenBLAS thread per call, unless the user chose otherwise (imported first by `fenchel`).

jax's CPU linear algebra (Cholesky, triangular solves, eigh: once per W block in every lifted step) runs in
scipy's OpenBLAS, whose own worker threads then compete with XLA's for the cores. On the 2-core CPU a 100×100
`fenchel.solvers.cholesky_inverse` took 0.14 ms at the median but 10 ms at the 90th percentile with OpenBLAS's
default thread count, and 0.12 / 0.5 ms with one thread (docs/benchmarks.md, "BLAS threads"). OpenBLAS reads
OPENBLAS_NUM_THREADS when it loads, at jax's first LAPACK call or at scipy.linalg's import, so this runs before
either when fenchel is imported first; a value the user set is kept.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
