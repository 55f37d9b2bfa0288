"""Tests run in float64 so that mathematical identities can be checked tightly, on 8 forced CPU devices
(for the sharding tests; everything else runs on the first)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

import fenchel  # noqa: E402,F401  (one OpenBLAS thread, set before the test modules import scipy.linalg)

jax.config.update("jax_enable_x64", True)
