"""Tests run in float64 so that mathematical identities can be checked tightly."""

import jax

jax.config.update("jax_enable_x64", True)
