"""Block-coordinate descent: monotone full-batch sweeps, schedules, no retracing, minibatch fitting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fenchel import SCHEDULES, LiftedConfig, LiftedTrainer, SolverConfig, init_mlp
from fenchel.penalties import ACTIVATIONS

SIZES = (5, 8, 7, 6, 3)  # three hidden layers: both parities in the parallel schedule


def toy(n=48, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, SIZES[0]))
    labels = (jnp.sum(x[:, :2], axis=1) > 0).astype(jnp.int32) + (x[:, 2] > 0.5).astype(jnp.int32)
    return x, labels, jax.nn.one_hot(labels, SIZES[-1])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_full_batch_objective_never_increases(act, schedule):
    x, _, y = toy()
    cfg = LiftedConfig(activation=act, schedule=schedule, lambdas=(1.0, 0.5, 2.0), rho=1e-3,
                       x_solver=SolverConfig(tol=1e-7, max_steps=50), w_solver=SolverConfig(tol=1e-7, max_steps=50))
    tr = LiftedTrainer(cfg, len(SIZES) - 1)
    params = init_mlp(jax.random.PRNGKey(1), SIZES, jnp.float64)
    _, _, history = tr.fit_full_batch(params, x, y, sweeps=30)
    h = np.asarray(history)
    assert np.all(np.isfinite(h))
    assert np.all(np.diff(h) <= 1e-12 * np.abs(h[:-1])), np.diff(h).max()
    assert h[-1] < 0.7 * h[0]  # and it makes real progress


def test_schedules_reach_comparable_objectives():
    x, _, y = toy()
    params = init_mlp(jax.random.PRNGKey(1), SIZES, jnp.float64)
    finals = {}
    for schedule in SCHEDULES:
        tr = LiftedTrainer(LiftedConfig(schedule=schedule, rho=1e-3), len(SIZES) - 1)
        finals[schedule] = tr.fit_full_batch(params, x, y, sweeps=40)[2][-1]
    a, b = finals["sequential"], finals["parallel"]
    assert abs(a - b) <= 0.1 * max(a, b), finals


def test_parallel_w_step_equals_block_by_block():
    """All W blocks in one jitted call give exactly what one call per block gives."""
    x, _, y = toy()
    params = init_mlp(jax.random.PRNGKey(2), SIZES, jnp.float64)
    tr = LiftedTrainer(LiftedConfig(rho=1e-3, rho_prox=0.5), len(SIZES) - 1)
    xs = tr.forward(params, x)
    xs, _ = tr.x_step(params, xs, x, y)
    anchors = init_mlp(jax.random.PRNGKey(3), SIZES, jnp.float64)
    together, _ = tr.w_step(params, xs, x, y, anchors)
    for l in range(len(params)):
        alone, _ = tr.w_block(l, params, xs, x, y, anchors)
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(together[l][name], alone[name], rtol=0, atol=1e-13)


def test_parallel_x_half_sweep_equals_sequential_blocks():
    """Odd layers solved at once equal the same blocks solved one at a time from the same X."""
    x, _, y = toy()
    params = init_mlp(jax.random.PRNGKey(4), SIZES, jnp.float64)
    tr = LiftedTrainer(LiftedConfig(schedule="parallel"), len(SIZES) - 1)
    xs = tr.forward(params, x)
    xs = [z + 0.1 for z in xs]
    new_xs, _ = tr.x_step(params, xs, x, y)
    # odd layers (1, 3) read only even ones, which the first half-sweep has not changed
    for l in (1, 3):
        alone, _ = jax.jit(lambda p, z, l=l: tr._x_block(l, p, z, x, y))(params, xs)
        np.testing.assert_allclose(new_xs[l - 1], alone, atol=1e-13)


def test_minibatch_epoch_compiles_once_and_fits_a_small_problem():
    x, labels, y = toy(n=256, seed=3)
    cfg = LiftedConfig(lambdas=1.0, rho=1e-4, rho_prox=0.05, x_solver=SolverConfig(tol=1e-5, max_steps=30),
                       w_solver=SolverConfig(tol=1e-5, max_steps=30))
    tr = LiftedTrainer(cfg, len(SIZES) - 1)
    params = init_mlp(jax.random.PRNGKey(5), SIZES, jnp.float64)
    key = jax.random.PRNGKey(6)
    acc0 = float(jnp.mean(jnp.argmax(tr.predict(params, x), -1) == labels))
    for _ in range(40):
        key, sub = jax.random.split(key)
        params, metrics, _ = tr.run_epoch(params, x, y, batch_size=32, key=sub)
    assert tr.minibatch_update._cache_size() == 1  # one compilation for the whole run
    acc = float(jnp.mean(jnp.argmax(tr.predict(params, x), -1) == labels))
    assert acc >= 0.95 and acc > acc0 + 0.2, (acc0, acc)
    assert not bool(metrics.nonfinite)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lambdas"):
        LiftedConfig(lambdas=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        LiftedConfig(schedule="random")
    with pytest.raises(ValueError, match="activation"):
        LiftedConfig(activation="gelu")
    with pytest.raises(ValueError, match="per layer"):
        LiftedTrainer(LiftedConfig(lambdas=(1.0, 2.0)), 4)
    with pytest.raises(ValueError, match="rho_prox"):
        LiftedConfig(rho_prox=(0.1, -0.1))


def test_per_layer_rho_prox_reaches_each_w_block():
    """ρ' per layer: a huge ρ' on one layer pins it to its anchor, the other layer moves."""
    x, _, y = toy()
    params = init_mlp(jax.random.PRNGKey(7), SIZES, jnp.float64)
    tr = LiftedTrainer(LiftedConfig(rho_prox=(1e9, 0.1, 0.1, 0.1), rho=0.0), len(SIZES) - 1)
    new, _ = tr.minibatch_update(params, x, y)
    assert float(jnp.max(jnp.abs(new[0]["kernel"] - params[0]["kernel"]))) < 1e-6
    assert float(jnp.max(jnp.abs(new[-1]["kernel"] - params[-1]["kernel"]))) > 1e-3
