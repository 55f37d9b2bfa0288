"""Tests run in float64 so that mathematical identities can be checked tightly, on 8 forced CPU devices
(for the sharding tests; everything else runs on the first)."""

import gc
import os

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

import fenchel  # noqa: E402,F401  (one OpenBLAS thread, set before the test modules import scipy.linalg)

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable holds its own memory
    mappings; the whole suite compiles thousands of programs, and kept alive together they exceed the kernel's
    map limit (vm.max_map_count, 65530 by default): LLVM then aborts the process ("Cannot allocate memory").
    test_bcd.py alone leaves 16,000 mappings; cleared, 1,100 remain."""
    yield
    jax.clear_caches()
    gc.collect()
