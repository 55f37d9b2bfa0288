"""Block-coordinate descent: monotone full-batch sweeps, schedules, W steps against SciPy, minibatch training.

Expected values come from numpy/SciPy written here (the lifted objective, each W block's objective with a
hand-written gradient, closed forms) or, for the schedules, from single block solves on hand-assembled X lists.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from fenchel import SCHEDULES, LiftedConfig, LiftedTrainer, init_params, mlp
from fenchel.bcd import X_CHUNK_BYTES_CPU
from fenchel.penalties import ACTIVATIONS
from fenchel.solvers import Result

SIZES = (5, 8, 7, 6, 3)  # three hidden layers: both parities in the parallel schedule
SMALL = (5, 6, 4, 3)  # two hidden layers, for the (compile-heavy) sweep tests
SLOPE = 0.01  # LiftedConfig's default negative_slope


# ---------------------------------------------------------------- numpy reference
def np_phi(act, u):
    return {"relu": lambda: np.maximum(u, 0.0), "leaky_relu": lambda: np.where(u >= 0, u, SLOPE * u),
            "sigmoid": lambda: special.expit(u), "tanh": lambda: np.tanh(u)}[act]()


def np_penalty(act, u, v):
    """B = F(u) + F*(v) − u·v, elementwise, from the textbook formulas."""
    xlogx = lambda z: special.xlogy(z, z)  # noqa: E731
    if act == "relu":
        return 0.5 * np.maximum(u, 0) ** 2 + 0.5 * v**2 - u * v
    if act == "leaky_relu":
        return (0.5 * np.maximum(u, 0) ** 2 + 0.5 * SLOPE * np.minimum(u, 0) ** 2
                + 0.5 * np.maximum(v, 0) ** 2 + 0.5 / SLOPE * np.minimum(v, 0) ** 2 - u * v)
    if act == "sigmoid":
        return np.logaddexp(0.0, u) + xlogx(v) + xlogx(1 - v) - u * v
    return np.logaddexp(u, -u) - np.log(2.0) + 0.5 * (xlogx(1 + v) + xlogx(1 - v)) - u * v


def np_softmax_ce(y, u):
    """Per-sample −Σ y log softmax(u) and its gradient in u."""
    logp = special.log_softmax(u, axis=1)
    return -np.sum(y * logp, axis=1), np.exp(logp) * np.sum(y, axis=1, keepdims=True) - y


def as_np(params):
    return [(np.asarray(p["kernel"]), np.asarray(p["bias"])) for p in params]


def np_forward(act, params, x0):
    xs, x = [], np.asarray(x0)
    for w, b in as_np(params)[:-1]:
        x = np_phi(act, x @ w + b)
        xs.append(x)
    w, b = as_np(params)[-1]
    return xs, x @ w + b


def np_objective(act, params, xs, x0, y, lambdas, rho):
    """F = (1/N)[Σ_i loss(Y_i, U_L,i) + Σ_l λ_l Σ_ij B(U_l,ij, X_l+1,ij)] + Σ_l ρ_l ‖W_l‖², softmax loss."""
    params, x0, y = as_np(params), np.asarray(x0), np.asarray(y)
    inputs = [x0, *(np.asarray(z) for z in xs)]
    n = x0.shape[0]
    lambdas = np.broadcast_to(lambdas, (len(params) - 1,))
    rho = np.broadcast_to(rho, (len(params),))
    data = np.sum(np_softmax_ce(y, inputs[-1] @ params[-1][0] + params[-1][1])[0])
    pens = sum(lam * np.sum(np_penalty(act, inputs[l] @ w + b, inputs[l + 1]))
               for l, ((w, b), lam) in enumerate(zip(params[:-1], lambdas)))
    return (data + pens) / n + sum(r * np.sum(w**2) for (w, _), r in zip(params, rho))


def w_block_objective(x_in, n_out, fit, rho, anchor, rho_prox):
    """(value, gradient) of fit(XW + 1bᵀ) + ρ‖W‖² + ρ'‖(W, b) − anchor‖² on flat (W, b); fit(U) → (value, ∂/∂U)."""
    n_in = x_in.shape[1]
    wa, ba = np.asarray(anchor["kernel"]), np.asarray(anchor["bias"])

    def fg(flat):
        w, b = flat[: n_in * n_out].reshape(n_in, n_out), flat[n_in * n_out:]
        val, g = fit(x_in @ w + b)
        val = val + rho * np.sum(w**2) + rho_prox * (np.sum((w - wa) ** 2) + np.sum((b - ba) ** 2))
        gw = x_in.T @ g + 2 * rho * w + 2 * rho_prox * (w - wa)
        return val, np.concatenate([gw.ravel(), np.sum(g, axis=0) + 2 * rho_prox * (b - ba)])

    return fg


# ---------------------------------------------------------------- fixtures
def toy(n=48, seed=0, sizes=SIZES):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, sizes[0]))
    labels = (jnp.sum(x[:, :2], axis=1) > 0).astype(jnp.int32) + (x[:, 2] > 0.5).astype(jnp.int32)
    return x, labels, jax.nn.one_hot(labels, sizes[-1])


def init(seed, sizes=SIZES):
    return init_params(jax.random.PRNGKey(seed), mlp(sizes), (sizes[0],), jnp.float64)


@functools.lru_cache(maxsize=None)
def trainer(sizes=SIZES, **config):
    """One trainer (and so one set of jitted functions) per configuration, shared by the tests."""
    return LiftedTrainer(LiftedConfig(**config), mlp(sizes))


# ---------------------------------------------------------------- full batch
MONOTONE = dict(lambdas=(1.0, 2.0), rho=1e-3, lbd_coef=1.0, x_tol=1e-7, x_max_steps=50, w_tol=1e-7, w_max_steps=50)


# every activation and both schedules appear (the full 4 × 2 product costs a sweep compilation each)
MONOTONE_CASES = [("relu", "sequential"), ("relu", "parallel"), ("leaky_relu", "sequential"), ("sigmoid", "parallel"),
                  ("tanh", "sequential")]
assert {a for a, _ in MONOTONE_CASES} == set(ACTIVATIONS) and {s for _, s in MONOTONE_CASES} == set(SCHEDULES)


@pytest.mark.parametrize("act, schedule", MONOTONE_CASES)
def test_full_batch_objective_never_increases(act, schedule):
    """κ = 1: every block returns a point no worse than its start, so F (numpy, independent) never increases."""
    x, _, y = toy(sizes=SMALL)
    tr = trainer(SMALL, activation=act, schedule=schedule, **MONOTONE)
    params = init(1, SMALL)
    lambdas, rho = MONOTONE["lambdas"], MONOTONE["rho"]
    ours = [np_objective(act, params, np_forward(act, params, x)[0], x, y, lambdas, rho)]

    def record(k, p, xs, info):
        ours.append(np_objective(act, p, xs, x, y, lambdas, rho))

    _, _, history = tr.fit_full_batch(params, x, y, sweeps=12, callback=record)
    h = np.asarray(ours)
    assert np.all(np.isfinite(h)) and len(h) == 13
    assert np.all(np.diff(h) <= 1e-11 * np.abs(h[:-1])), np.diff(h).max()
    assert h[-1] < 0.8 * h[0], h  # and it makes real progress
    # the library's objective_terms, as reported in the history, is the same F
    np.testing.assert_allclose(history, h, rtol=1e-10)


def test_schedules_reach_comparable_objectives():
    x, _, y = toy(sizes=SMALL)
    params = init(1, SMALL)
    finals = {s: trainer(SMALL, activation="relu", schedule=s, **MONOTONE).fit_full_batch(params, x, y, sweeps=40)[2]
              for s in SCHEDULES}
    a, b = finals["sequential"][-1], finals["parallel"][-1]
    assert abs(a - b) <= 0.1 * max(a, b), (a, b)
    assert max(a, b) < 0.5 * finals["sequential"][0]


# ---------------------------------------------------------------- X schedules
def perturbed_forward(params, x):
    return [jnp.asarray(z + 0.1) for z in np_forward("relu", params, x)[0]]  # off the graph, inside the ReLU domain


def test_parallel_x_step_half_sweeps():
    """Parallel schedule, layers 1..3: X_1, X_3 from the old X (they read only X_2); then X_2 from the NEW X_1, X_3."""
    x, _, y = toy()
    params = init(4)
    tr = trainer(schedule="parallel")
    old = perturbed_forward(params, x)
    new, infos = tr.x_step(params, old, x, y)
    assert len(new) == 3 and len(infos) == 3
    odd = {l: tr.x_block(l, params, old, x, y)[0] for l in (1, 3)}
    for l in (1, 3):
        np.testing.assert_allclose(new[l - 1], odd[l], atol=1e-12)
    gauss_seidel, _ = tr.x_block(2, params, [odd[1], old[1], odd[3]], x, y)
    np.testing.assert_allclose(new[1], gauss_seidel, atol=1e-12)
    jacobi, _ = tr.x_block(2, params, old, x, y)  # a half-sweep that read the stale X_1, X_3
    assert float(jnp.max(jnp.abs(new[1] - jacobi))) > 1e-3


# ---------------------------------------------------------------- blocks of the lifted objective
# per-layer values everywhere (distinct), so that a block reading another layer's λ, ρ or ρ' fails
LAMBDAS, RHOS, PROXES = (1.0, 0.5, 2.0), (1e-3, 2e-3, 3e-3, 4e-3), (0.5, 0.3, 0.2, 0.1)
TIGHT = dict(lambdas=LAMBDAS, rho=RHOS, rho_prox=PROXES, x_tol=1e-10, x_max_steps=20000, w_tol=1e-10,
             w_max_steps=20000)


def tanh_off_graph(params, x, seed):
    """Hidden activations near the forward pass but off the graph of tanh, inside (−1, 1)."""
    rng = np.random.default_rng(seed)
    return [np.tanh(np.arctanh(z) + 0.3 * rng.normal(size=z.shape)) for z in np_forward("tanh", params, x)[0]]


def np_grad_x_leaky(l, params, xs, x0, y):
    """N·∂F/∂X_l (leaky ReLU, softmax): λ_{l−1}((F*)'(X_l) − U_{l−1}) + λ_l (φ(U_l) − X_{l+1}) W_lᵀ, or, for the last
    hidden layer, + (softmax(U_L) − Y) W_Lᵀ; ∂B/∂v = (F*)'(v) − u = φ⁻¹(v) − u, ∂B/∂u = φ(u) − v."""
    p, inputs = as_np(params), [np.asarray(x0), *xs]
    u_prev = inputs[l - 1] @ p[l - 1][0] + p[l - 1][1]
    u_next = inputs[l] @ p[l][0] + p[l][1]
    v = inputs[l]
    g = LAMBDAS[l - 1] * (np.where(v >= 0, v, v / SLOPE) - u_prev)
    if l < len(p) - 1:
        return g + LAMBDAS[l] * (np_phi("leaky_relu", u_next) - inputs[l + 1]) @ p[l][0].T
    return g + np_softmax_ce(np.asarray(y), u_next)[1] @ p[l][0].T


def test_sequential_x_step_minimises_each_block():
    """Sequential schedule (Gauss–Seidel from the last layer): X_3 minimises F given the old X_2, X_2 given the new X_3
    and the old X_1, X_1 given the new X_2; by the hand-written gradient of F in X_l (leaky ReLU: no constraint, so
    the gradient vanishes). A wrong order, a Jacobi sweep or a block with another layer's λ fails."""
    x, _, y = toy()
    tr = trainer(activation="leaky_relu", **TIGHT)
    params = init(2)
    rng = np.random.default_rng(10)
    old = [z + 0.3 * rng.normal(size=z.shape) for z in np_forward("leaky_relu", params, x)[0]]  # off the graph
    new, infos = tr.x_step(params, [jnp.asarray(z) for z in old], x, y)
    new = [np.asarray(z) for z in new]
    assert all(np.all(np.asarray(i.result) == 0) for i in infos)  # Result.CONVERGED
    seen = {3: [old[0], old[1], new[2]], 2: [old[0], new[1], new[2]], 1: new}  # the X each block was solved with
    for l, xs in seen.items():
        assert np.max(np.abs(np_grad_x_leaky(l, params, xs, x, y))) <= 1e-7, l
    # X_1 did not see the old X_2
    assert np.max(np.abs(np_grad_x_leaky(1, params, [new[0], old[1], old[2]], x, y))) > 1e-3


def test_w_step_solves_every_block():
    """Each W block of w_step is the minimiser of its own objective (per-layer λ, ρ, ρ', anchor), by SciPy."""
    x, _, y = toy()
    lambdas, rhos, proxes = LAMBDAS, RHOS, PROXES
    tr = trainer(activation="tanh", **TIGHT)
    params, anchors = init(2), init(3)
    xs = tanh_off_graph(params, x, 9)
    new, infos = tr.w_step(params, [jnp.asarray(z) for z in xs], x, y, anchors, False)
    assert all(int(i.result) == 0 for i in infos)  # Result.CONVERGED
    inputs = [np.asarray(x), *xs]
    n = x.shape[0]
    for l, p in enumerate(new):
        if l < len(lambdas):
            x_out, lam = xs[l], lambdas[l]

            def fit(u, x_out=x_out, lam=lam):
                return (lam / n * np.sum(np_penalty("tanh", u, x_out)), lam / n * (np.tanh(u) - x_out))
        else:
            def fit(u):
                val, g = np_softmax_ce(np.asarray(y), u)
                return np.mean(val), g / n
        fg = w_block_objective(inputs[l], SIZES[l + 1], fit, rhos[l], anchors[l], proxes[l])
        flat = np.concatenate([np.asarray(p["kernel"]).ravel(), np.asarray(p["bias"])])
        val, grad = fg(flat)
        assert np.linalg.norm(grad) <= 1e-8, (l, np.linalg.norm(grad))
        res = optimize.minimize(fg, np.zeros_like(flat), jac=True, method="L-BFGS-B",
                                options={"maxiter": 50000, "ftol": 1e-16, "gtol": 1e-12, "maxcor": 40})
        assert abs(val - res.fun) <= 1e-9 * abs(res.fun), (l, val, res.fun)
        np.testing.assert_allclose(flat, res.x, atol=1e-6)


# ---------------------------------------------------------------- minibatch
def test_minibatch_training_compiles_once_and_fits_a_small_problem():
    """The Trainer interface with our own batch loop: one compilation, ≥ 95% train accuracy."""
    x, labels, y = toy(n=256, seed=3)
    tr = trainer(lambdas=1.0, rho=1e-4, rho_prox=0.05, x_tol=1e-5, x_max_steps=30, w_tol=1e-5, w_max_steps=30)
    params = init(5)
    acc0 = float(np.mean(np.argmax(np_forward("relu", params, x)[1], -1) == np.asarray(labels)))
    state = tr.init(params)
    rng = np.random.default_rng(6)
    for _ in range(40):
        for batch in rng.permutation(256).reshape(-1, 32):
            state, info = tr.step(state, x[batch], y[batch])
            assert not bool(info.nonfinite)
    assert tr.minibatch_update._cache_size() == 1  # one compilation for the whole run
    acc = float(np.mean(np.argmax(np_forward("relu", tr.params(state), x)[1], -1) == np.asarray(labels)))
    assert acc >= 0.95 and acc > acc0 + 0.2, (acc0, acc)


def test_minibatch_update_with_zero_lambda_is_the_closed_form():
    """LiftedConfig(lambdas=0.0, rho_prox=…) once crashed (ZeroDivisionError in the kernel_mm W solver). With λ = 0 a
    hidden W block is min ρ_l‖W‖² + ρ'_l‖(W, b) − (W_l, b_l)‖²: W = ρ'_l/(ρ_l + ρ'_l)·W_l, b = b_l. A batch of 4 ≤
    every n_in makes "auto" use kernel_mm. Per-layer ρ, ρ' (distinct values; a huge ρ' pins the output layer to its
    anchor) check that each W block gets its own. Two hidden layers keep the compilation short."""
    x, _, y = toy(n=4, seed=8, sizes=SMALL)
    rhos, proxes = (1e-3, 3e-1, 1e-3), (0.1, 0.05, 1e9)
    tr = trainer(SMALL, lambdas=0.0, rho=rhos, rho_prox=proxes, w_tol=1e-12, w_max_steps=50)
    params = init(7, SMALL)
    new, info = tr.minibatch_update(params, x, y)
    assert not bool(info.nonfinite)
    for l in range(2):
        shrink = proxes[l] / (rhos[l] + proxes[l])
        np.testing.assert_allclose(new[l]["kernel"], shrink * np.asarray(params[l]["kernel"]), atol=1e-10)
        np.testing.assert_allclose(new[l]["bias"], params[l]["bias"], atol=1e-10)
    assert float(jnp.max(jnp.abs(new[-1]["kernel"] - params[-1]["kernel"]))) < 1e-6


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lambdas"):
        LiftedConfig(lambdas=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        LiftedConfig(schedule="random")
    with pytest.raises(ValueError, match="activation"):
        LiftedConfig(activation="gelu")
    with pytest.raises(ValueError, match="per layer"):
        LiftedTrainer(LiftedConfig(lambdas=(1.0, 2.0)), mlp(SIZES))  # 3 penalties need 3 values
    with pytest.raises(ValueError, match="rho_prox"):
        LiftedConfig(rho_prox=(0.1, -0.1))
    with pytest.raises(ValueError, match="hidden layer"):
        LiftedTrainer(LiftedConfig(), mlp((5, 3)))


# ---------------------------------------------------------------- stacked W blocks (stack_layers)
EQUAL = (5, 6, 6, 6, 3)  # W_1 and W_2 are both 6 → 6: one stacked group


@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_stacked_w_step_equals_the_list_of_blocks(granularity):
    """stack_layers="on" solves W_1, W_2 as one vmapped block; each result equals its own block's solve (the
    list form, checked against SciPy above). λ differs per layer (and per neuron), so a stack that pairs a
    layer with another layer's λ, X or anchor fails; so does one that drops the anchor."""
    x, _, y = toy(sizes=EQUAL)
    params, anchors = init(2, EQUAL), init(3, EQUAL)
    xs = [jnp.asarray(z) for z in tanh_off_graph(params, x, 9)]
    cfg = dict(activation="tanh", lambdas=(1.0, 0.5, 2.0), rho=1e-3, rho_prox=0.2, w_tol=1e-12, w_max_steps=7)
    on, off = trainer(EQUAL, stack_layers="on", **cfg), trainer(EQUAL, stack_layers="off", **cfg)
    assert on._w_groups(xs, x) == [[0], [1, 2], [3]] and off._w_groups(xs, x) == [[0], [1], [2], [3]]
    lams = None
    if granularity == "neuron":
        rng = np.random.default_rng(4)
        lams = tuple(jnp.asarray(rng.uniform(0.5, 3.0, 6)) for _ in range(3))
    stacked, s_infos = on.w_step(params, xs, x, y, anchors, False, lams=lams)
    listed, l_infos = off.w_step(params, xs, x, y, anchors, False, lams=lams)
    for l, (a, b) in enumerate(zip(stacked, listed)):
        for k in ("kernel", "bias"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-12, err_msg=f"layer {l} {k}")
        assert int(s_infos[l].steps) == int(l_infos[l].steps)
    assert not np.allclose(stacked[1]["kernel"], params[1]["kernel"])  # the blocks moved


def _float32_blocks_one_cannot_factor(raw_layer: int):
    """float32 W step inputs of a 5-16-16-16-3 network, 12 samples ≤ 16 inputs (the kernel forms): W_raw_layer's
    input raw-scale and nearly collinear (its kernel_mm system cannot be factored in float32), the others
    unit-scale. Returns (sizes, x, y, xs, params)."""
    sizes, f32 = (5, 16, 16, 16, 3), jnp.float32
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(12, 5)), f32)
    y = jax.nn.one_hot(rng.integers(0, 3, 12), 3, dtype=f32)
    xs = [np.abs(rng.normal(size=(12, 16))) for _ in range(3)]
    xs[raw_layer - 1] = 1e4 * np.abs(rng.normal(size=(1, 16))) + rng.normal(size=(12, 16))
    params = jax.tree_util.tree_map(lambda a: a.astype(f32), init(2, sizes))
    return sizes, x, y, [jnp.asarray(a, f32) for a in xs], params


W_RETRY_CFG = dict(lambdas=(1.0, 1.0, 1.0), rho=1e-5, rho_prox=0.1)


def test_a_float32_stacked_w_step_retries_the_block_it_cannot_factor_like_the_list_of_blocks():
    """float32, stack_layers="on", W_1's kernel_mm system not factorable (`_float32_blocks_one_cannot_factor`).
    The stacked W step must retry W_1 in the primal_mm form like the list of blocks does (`blocks.solve_w`), not
    report it non-finite."""
    sizes, x, y, xs, params = _float32_blocks_one_cannot_factor(1)
    on, off = trainer(sizes, stack_layers="on", **W_RETRY_CFG), trainer(sizes, stack_layers="off", **W_RETRY_CFG)
    assert on._w_groups(xs, x) == [[0], [1, 2], [3]]
    stacked, s_infos = on.w_step(params, xs, x, y, params, True)
    listed, l_infos = off.w_step(params, xs, x, y, params, True)
    for l in (1, 2):
        assert int(s_infos[l].result) == int(l_infos[l].result) != Result.NONFINITE, f"layer {l}"
        scale = float(np.abs(np.asarray(listed[l]["kernel"])).max())
        np.testing.assert_allclose(np.asarray(stacked[l]["kernel"]), np.asarray(listed[l]["kernel"]), rtol=0,
                                   atol=1e-2 * scale, err_msg=f"layer {l}")


@pytest.mark.parametrize("stack_layers", ["on", "off"])
@pytest.mark.parametrize("raw_layer", [1, 3], ids=["hidden", "output"])
def test_w_retry_false_leaves_the_block_it_cannot_factor_non_finite_and_the_others_unchanged(raw_layer, stack_layers):
    """w_retry=False: the block whose float32 kernel_mm system cannot be factored (a hidden one, stacked or
    not, or the output layer's) comes back NONFINITE, where w_retry=True solves it again; every other block's
    result is the same either way."""
    sizes, x, y, xs, params = _float32_blocks_one_cannot_factor(raw_layer)
    results = {}
    for retry in (True, False):
        tr = trainer(sizes, stack_layers=stack_layers, w_retry=retry, **W_RETRY_CFG)
        results[retry] = tr.w_step(params, xs, x, y, params, True)
    (with_retry, with_infos), (without, without_infos) = results[True], results[False]
    assert int(with_infos[raw_layer].result) != Result.NONFINITE
    assert np.isfinite(np.asarray(with_retry[raw_layer]["kernel"])).all()
    assert int(without_infos[raw_layer].result) == Result.NONFINITE
    for l in set(range(len(sizes) - 1)) - {raw_layer}:
        assert int(with_infos[l].result) == int(without_infos[l].result) != Result.NONFINITE, f"layer {l}"
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(with_retry[l][k]), np.asarray(without[l][k]),
                                          err_msg=f"layer {l} {k}")


def _raw_scale_float32_batch():
    """12 float32 samples of 16 raw-scale, nearly collinear inputs (W_0's kernel_mm system cannot be factored in
    float32), labels of 3 classes, and a 16-16-3 network's float32 weights."""
    sizes, f32 = (16, 16, 3), jnp.float32
    rng = np.random.default_rng(11)
    x = jnp.asarray(1e4 * np.abs(rng.normal(size=(1, 16))) + rng.normal(size=(12, 16)), f32)
    y = jax.nn.one_hot(rng.integers(0, 3, 12), 3, dtype=f32)
    return sizes, x, y, jax.tree_util.tree_map(lambda a: a.astype(f32), init(3, sizes))


@pytest.mark.parametrize("alternations", [1, 2])
def test_a_minibatch_step_without_the_w_retry_reports_the_block_it_cannot_factor(alternations):
    """The step's SweepInfo, which the launcher stops on: w_retry=False reports W_0's failed solve as non-finite
    (the weights stay finite: the block keeps its start), w_retry=True solves it again and goes on."""
    sizes, x, y, params = _raw_scale_float32_batch()
    for retry in (True, False):
        tr = trainer(sizes, w_retry=retry, alternations=alternations, lambdas=1.0, rho=1e-5, rho_prox=0.1)
        new, info = tr.minibatch_update(params, x, y)
        assert bool(info.nonfinite) is not retry, f"w_retry={retry}"
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(new))


def test_a_block_non_finite_in_an_earlier_round_is_still_reported_after_the_last():
    """alternations=2: a round-1 block that met a non-finite value (and kept its start) must reach the step's
    SweepInfo even when round 2's blocks are all finite; only the last round's flag would lose it."""
    x, _, y = toy(n=16)

    class FirstRoundFails(LiftedTrainer):
        def _round(self, *args, anchor_is_start=False, **kwargs):
            params, xs, info = super()._round(*args, anchor_is_start=anchor_is_start, **kwargs)
            return params, xs, info._replace(nonfinite=info.nonfinite | anchor_is_start)

    flagged = FirstRoundFails(LiftedConfig(alternations=2), mlp(SIZES))
    assert bool(flagged.minibatch_update(init(0), x, y)[1].nonfinite)
    plain = trainer(alternations=2)
    assert not bool(plain.minibatch_update(init(0), x, y)[1].nonfinite)


def test_a_full_batch_fit_stops_at_a_block_that_met_a_non_finite_value():
    """fit_full_batch without the W retry on inputs whose float32 kernel_mm system cannot be factored: W_0 keeps
    its start and the objective stays finite, so only the sweep's non-finite flag can stop it; with the retry it
    runs."""
    sizes, x, y, params = _raw_scale_float32_batch()
    with pytest.raises(FloatingPointError, match="non-finite value at sweep 1"):
        trainer(sizes, w_retry=False, lambdas=1.0).fit_full_batch(params, x, y, sweeps=2)
    history = trainer(sizes, w_retry=True, lambdas=1.0).fit_full_batch(params, x, y, sweeps=2)[2]
    assert np.isfinite(history).all()


def test_w_retry_rejects_a_non_boolean():
    with pytest.raises(ValueError, match="w_retry"):
        LiftedConfig(w_retry="no")


def test_stacked_minibatch_training_equals_unstacked():
    """A few minibatch updates (dual λ, so λ is traced state) give the same weights and λ stacked or not."""
    x, _, y = toy(n=64, sizes=EQUAL)
    cfg = dict(lambdas=(1.0, 0.5, 2.0), rho=1e-4, rho_prox=0.1, lambda_update="dual", lambda_step=5.0)
    states = []
    for mode in ("on", "off"):
        tr = trainer(EQUAL, stack_layers=mode, **cfg)
        state = tr.init(init(5, EQUAL))
        for batch in np.arange(64).reshape(-1, 16):
            state, _ = tr.step(state, x[batch], y[batch])
        states.append(state)
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_full_batch_sweep_with_x_blocks_in_row_chunks_equals_the_unchunked_sweep():
    """x_chunk_bytes = 10 rows of the widest X (48 rows: 4 chunks and a remainder of 8) in both schedules: the
    rows are independent problems, so the sweep's weights, X and objective history are those of the sweep that
    solves every X block in one piece (0), to float64 rounding."""
    x, _, y = toy()
    params = init(7)
    for schedule in SCHEDULES:
        cfg = dict(activation="sigmoid", schedule=schedule, lambdas=(1.0, 2.0, 0.5), x_tol=1e-9, x_max_steps=40)
        whole = trainer(x_chunk_bytes=0, **cfg).fit_full_batch(params, x, y, sweeps=2)
        chunked = trainer(x_chunk_bytes=10 * max(SIZES[1:-1]) * 8, **cfg).fit_full_batch(params, x, y, sweeps=2)
        assert whole[2][-1] < whole[2][0]
        for a, b in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_x_chunk_bytes_default_is_on_for_the_cpu_only_and_rejects_bad_values():
    expected = X_CHUNK_BYTES_CPU if jax.default_backend() == "cpu" else 0
    assert LiftedConfig().x_solver.chunk_bytes == expected
    assert LiftedConfig(x_chunk_bytes=0).x_solver.chunk_bytes == 0
    assert LiftedConfig(x_chunk_bytes=4096).x_solver.chunk_bytes == 4096
    with pytest.raises(ValueError, match="x_chunk_bytes"):
        LiftedConfig(x_chunk_bytes=-2)


def test_stack_layers_rejects_unknown_value():
    with pytest.raises(ValueError, match="stack_layers"):
        LiftedConfig(stack_layers="yes")


# ---------------------------------------------------------------- outer momentum
def _tree_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _heavy_ball(w, v, w_new, beta):
    """The numpy recurrence: v ← βv + (W − W'), W ← W − v."""
    v = jax.tree_util.tree_map(lambda a, b, c: beta * a + (b - c), v, w, w_new)
    return jax.tree_util.tree_map(np.subtract, w, v), v


def test_outer_momentum_is_heavy_ball_on_the_updates():
    """outer_momentum β: W_t+1 = W_t − v_t+1 with v_t+1 = βv_t + (W_t − W'_t), W'_t the plain minibatch update from
    W_t (numpy recurrence over the plain trainer's updates). A flipped pseudo-gradient, β on the wrong term, or a
    pseudo-gradient taken from a stale start point each fail it."""
    x, _, y = toy(n=48, sizes=SMALL)
    cfg = dict(lambdas=1.0, rho=1e-4, rho_prox=0.2)
    beta = 0.7
    plain, mom = trainer(SMALL, **cfg), trainer(SMALL, outer_momentum=beta, **cfg)
    w = _tree_np(init(4, SMALL))
    v = jax.tree_util.tree_map(np.zeros_like, w)
    state = mom.init(init(4, SMALL))
    for k, batch in enumerate(np.arange(48).reshape(-1, 16)):
        w_new = _tree_np(plain.step(w, x[batch], y[batch])[0])
        w, v = _heavy_ball(w, v, w_new, beta)
        state, info = mom.step(state, x[batch], y[batch])
        assert not bool(info.nonfinite)
        for got, want in zip(jax.tree_util.tree_leaves(mom.params(state)), jax.tree_util.tree_leaves(w)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"step {k}")
    assert float(np.max(np.abs(v[0]["kernel"]))) > 1e-3  # the velocity is not trivially zero


def test_outer_momentum_leaves_lambda_and_head_to_their_own_rules():
    """With dual λ and a guide head, momentum moves the weights only: λ and the head state after each step are the
    plain trainer's from the same (weights, λ, head state), and the weights follow the heavy-ball recurrence."""
    from fenchel.heads import Head

    x, _, y = toy(n=48, sizes=SMALL)
    cfg = LiftedConfig(lambdas=(1.0, 0.5), rho=1e-4, rho_prox=0.2, lambda_update="dual", lambda_step=3.0)
    beta = 0.5
    plain = LiftedTrainer(cfg, mlp(SMALL), Head(2, "guide", seed=1))
    mom = LiftedTrainer(dataclasses.replace(cfg, outer_momentum=beta), mlp(SMALL), Head(2, "guide", seed=1))
    state = mom.init(init(4, SMALL))
    ((w, head_state), lams), _ = state
    w = _tree_np(w)
    v = jax.tree_util.tree_map(np.zeros_like, w)
    for k, batch in enumerate(np.arange(48).reshape(-1, 16)):
        ((w_new, head_new), lams_new), _ = plain.step(((w, head_state), lams), x[batch], y[batch])
        w, v = _heavy_ball(w, v, _tree_np(w_new), beta)
        state, _ = mom.step(state, x[batch], y[batch])
        ((got_w, head_state), lams), _ = state
        np.testing.assert_allclose(lams, lams_new, rtol=1e-9, err_msg=f"step {k}")
        for a, b in zip(jax.tree_util.tree_leaves(head_state), jax.tree_util.tree_leaves(head_new)):
            np.testing.assert_allclose(a, b, rtol=1e-9, err_msg=f"step {k}")
        for a, b in zip(jax.tree_util.tree_leaves(got_w), jax.tree_util.tree_leaves(w)):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"step {k}")
    assert float(np.min(lams)) > 0.5  # dual ascent moved λ


def test_outer_momentum_rejects_values_outside_0_1():
    for beta in (-0.1, 1.0):
        with pytest.raises(ValueError, match="outer_momentum"):
            LiftedConfig(outer_momentum=beta)


# ---------------------------------------------------------------- audit additions
def test_x_blocks_weight_the_downstream_term_by_lbd_coef():
    """lbd_coef κ ≠ 1: numpy gradient of each X block vanishes (catches κ dropped from λ_next or the loss weight)."""
    x, _, y = toy()
    kappa = 0.3
    tr = trainer(activation="leaky_relu", lbd_coef=kappa, **TIGHT)
    params = init(2)
    rng = np.random.default_rng(11)
    xs = [jnp.asarray(z + 0.3 * rng.normal(size=z.shape)) for z in np_forward("leaky_relu", params, x)[0]]
    p, inputs = as_np(params), [np.asarray(x), *(np.asarray(z) for z in xs)]
    for l in (1, 3):
        new, info = tr.x_block(l, params, xs, x, y)
        assert np.all(np.asarray(info.result) == 0)  # Result.CONVERGED
        v = np.asarray(new)
        u_prev, u_next = inputs[l - 1] @ p[l - 1][0] + p[l - 1][1], v @ p[l][0] + p[l][1]
        down = (LAMBDAS[l] * (np_phi("leaky_relu", u_next) - inputs[l + 1]) if l < 3
                else np_softmax_ce(np.asarray(y), u_next)[1])
        grad = LAMBDAS[l - 1] * (np.where(v >= 0, v, v / SLOPE) - u_prev) + kappa * down @ p[l][0].T
        assert np.max(np.abs(grad)) <= 1e-7, (l, np.max(np.abs(grad)))


def test_later_minibatch_rounds_keep_the_first_rounds_anchor():
    """alternations=2: round-2 W blocks are optimal for the anchor W_t (catches anchor_is_start set after round 1)."""
    sizes, rhos, proxes, lam = (5, 6, 3), (1e-3, 3e-3), (0.3, 0.1), 1.5
    x, _, y = toy(n=4, seed=12, sizes=sizes)
    tr = trainer(sizes, lambdas=lam, rho=rhos, rho_prox=proxes, alternations=2, x_tol=1e-10, x_max_steps=2000,
                 w_tol=1e-10, w_max_steps=20000)
    params = init(13, sizes)
    new, xs, _ = jax.jit(tr._minibatch_rounds)(params, x, y)
    inputs, n = [np.asarray(x), np.asarray(xs[0])], x.shape[0]

    def hidden_fit(u):
        return lam / n * np.sum(np_penalty("relu", u, inputs[1])), lam / n * (np.maximum(u, 0.0) - inputs[1])

    def out_fit(u):
        val, g = np_softmax_ce(np.asarray(y), u)
        return np.mean(val), g / n

    for l, fit in enumerate((hidden_fit, out_fit)):
        fg = w_block_objective(inputs[l], sizes[l + 1], fit, rhos[l], params[l], proxes[l])
        flat = np.concatenate([np.asarray(new[l]["kernel"]).ravel(), np.asarray(new[l]["bias"])])
        assert np.linalg.norm(fg(flat)[1]) <= 1e-8, (l, np.linalg.norm(fg(flat)[1]))
    assert float(jnp.max(jnp.abs(new[0]["kernel"] - params[0]["kernel"]))) > 1e-3  # the rounds moved W
