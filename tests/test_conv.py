"""Convolutional lifted networks: conv/pool linear maps against numpy, the CNN objective, conv blocks, BCD."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from experiments.configs_util import load_config
from experiments.train import train_and_evaluate
from fenchel import SCHEDULES, LiftedConfig, LiftedTrainer, blocks, init_params
from fenchel.blocks import SolverConfig
from fenchel.layers import Conv, Dense, parse_layers
from fenchel.lifted import objective_terms
from fenchel.models import make_network, to_flax
from fenchel.penalties import get_penalty
from fenchel.solvers import Result

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- independent numpy references
def np_pool(x, p):
    if p == 1:
        return x
    n, h, w, c = x.shape
    return x.reshape(n, h // p, p, w // p, p, c).mean(axis=(2, 4))


def np_conv(x, w, stride=1, padding="VALID"):
    """Cross-correlation NHWC × HWIO, as in every deep-learning library, by explicit loops over the kernel."""
    k = w.shape[0]
    if padding == "SAME":
        h = x.shape[1]
        out = -(-h // stride)
        total = max((out - 1) * stride + k - h, 0)
        lo = total // 2
        x = np.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo), (0, 0)))
    n, h, wd, _ = x.shape
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, ho, wo, w.shape[3]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += np.einsum("nhwc,co->nhwo", patch, w[i, j])
    return out


def np_apply(spec, x, layer):
    kern, bias = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    x = np_pool(np.asarray(x, np.float64), spec.pool)
    if spec.kind == "conv":
        return np_conv(x, kern, spec.stride, spec.padding) + bias
    return x.reshape(x.shape[0], -1) @ kern + bias


def np_relu_B(u, v):
    return 0.5 * v**2 + 0.5 * np.maximum(u, 0) ** 2 - u * v


def np_softmax_xent(y, logits):
    m = logits.max(1, keepdims=True)
    return -np.sum(y * (logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))), axis=1)


SPECS = [Conv(4, 3), Conv(4, 3, stride=2), Conv(4, 3, padding="SAME"), Conv(4, 3, stride=2, padding="SAME"),
         Conv(4, 3, pool=2), Conv(3, 2, stride=2, padding="SAME", pool=2), Dense(5, pool=2), Dense(5)]


@pytest.fixture(params=["im2col", "toeplitz", "lax"])
def each_conv_impl(request, monkeypatch):
    """Run a test with each implementation of the convolution (`fenchel.layers.CONV_IMPL`)."""
    import fenchel.layers

    monkeypatch.setattr(fenchel.layers, "CONV_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("spec", SPECS + [Conv(3, 3, stride=2, padding="SAME"), Conv(2, 3, stride=2)], ids=repr)
def test_linear_maps_and_patches_match_numpy(spec, each_conv_impl):
    x = RNG.normal(size=(3, 8, 8, 2))
    layer = spec.init(jax.random.PRNGKey(1), (8, 8, 2), jnp.float64)
    layer["bias"] = jnp.asarray(RNG.normal(size=layer["bias"].shape))
    expected = np_apply(spec, x, layer)
    got = spec.linear_map(jnp.asarray(x), layer["kernel"]) + layer["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got.shape[1:] == spec.out_shape((8, 8, 2))
    z = spec.patches(jnp.asarray(x))
    np.testing.assert_allclose(z @ layer["kernel"].reshape(-1, layer["kernel"].shape[-1]),
                               (expected - np.asarray(layer["bias"])).reshape(z.shape[0], -1), atol=1e-12)
    flax_out = make_network((spec,)).apply({"params": {"layer_0": layer}}, jnp.asarray(x))
    np.testing.assert_allclose(flax_out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [8, 24])
def test_auto_conv_form_matches_numpy_on_narrow_and_wide_maps(width):
    """"auto" takes the row-Toeplitz form on the CPU for a map at most 4 kernel sizes wide (8 columns, k = 3) and
    im2col for a wider one (24 columns); both agree with numpy, stride 2 and SAME padding included."""
    import fenchel.layers

    assert fenchel.layers.CONV_IMPL == "auto"
    x = RNG.normal(size=(2, width, width, 2))
    for spec in (Conv(4, 3), Conv(3, 3, stride=2, padding="SAME")):
        layer = spec.init(jax.random.PRNGKey(2), x.shape[1:], jnp.float64)
        np.testing.assert_allclose(spec.linear_map(jnp.asarray(x), layer["kernel"]), np_apply(spec, x, layer),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS + [parse_layers("conv:3:3:same,pool:2,conv:2:3")], ids=repr)
def test_adjoint_identity(spec, each_conv_impl):
    """⟨A x, y⟩ = ⟨x, Aᵀ y⟩ with Aᵀ from jax.linear_transpose, for each map and a composition."""
    specs = spec if isinstance(spec, tuple) else (spec,)
    shape = (2, 8, 8, 2)
    kernels, s = [], shape[1:]
    for k, sp in enumerate(specs):
        kernels.append(sp.init(jax.random.PRNGKey(k), s, jnp.float64)["kernel"])
        s = sp.out_shape(s)

    def a(x):
        for sp, kern in zip(specs, kernels):
            x = sp.linear_map(x, kern)
        return x

    x = jnp.asarray(RNG.normal(size=shape))
    y = jnp.asarray(RNG.normal(size=a(x).shape))
    (aty,) = jax.linear_transpose(a, x)(y)
    assert abs(float(jnp.vdot(a(x), y)) - float(jnp.vdot(x, aty))) <= 1e-10 * float(jnp.abs(jnp.vdot(a(x), y)) + 1)


LAYERS = (*parse_layers("conv:3:3:same,pool:2,conv:4:3,dense:5"), Dense(3))
IN_SHAPE = (8, 8, 1)


def tiny_cnn_problem(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(size=(n, *IN_SHAPE)))
    y = jax.nn.one_hot(jnp.arange(n) % 3, 3, dtype=jnp.float64)
    params = init_params(jax.random.PRNGKey(seed), LAYERS, IN_SHAPE, jnp.float64)
    params = [{"kernel": p["kernel"], "bias": jnp.asarray(rng.normal(0, 0.1, p["bias"].shape))} for p in params]
    return x, y, params


def np_objective(params, xs, x, y, lambdas, rho):
    inputs = [np.asarray(x)] + [np.asarray(z) for z in xs]
    n = x.shape[0]
    total = 0.0
    for l in range(len(LAYERS) - 1):
        u = np_apply(LAYERS[l], inputs[l], params[l])
        total += lambdas[l] * np.sum(np_relu_B(u, inputs[l + 1])) / n
    logits = np_apply(LAYERS[-1], inputs[-1], params[-1])
    total += np.mean(np_softmax_xent(np.asarray(y), logits))
    return total + sum(rho * np.sum(np.asarray(p["kernel"]) ** 2) for p in params)


def test_cnn_objective_at_forward_pass_equals_the_flax_cnn_loss_plus_regulariser():
    x, y, params = tiny_cnn_problem()
    lambdas, rho = (0.7, 1.3, 2.0), 1e-2
    tr = LiftedTrainer(LiftedConfig(lambdas=lambdas, rho=rho), LAYERS)
    xs = tr.forward(params, x)
    # numpy forward pass and loss
    h, np_xs = np.asarray(x), []
    for spec, p in zip(LAYERS[:-1], params[:-1]):
        h = np.maximum(np_apply(spec, h, p), 0)
        np_xs.append(h)
    logits = np_apply(LAYERS[-1], h, params[-1])
    flax_logits = make_network(LAYERS).apply(to_flax(params), x)
    np.testing.assert_allclose(flax_logits, logits, rtol=1e-10, atol=1e-12)
    expected = np.mean(np_softmax_xent(np.asarray(y), logits)) + sum(rho * np.sum(np.asarray(p["kernel"]) ** 2)
                                                                     for p in params)
    terms = objective_terms(params, xs, x, y, get_penalty("relu"), lambdas, rho, layers=LAYERS)
    assert abs(float(terms["total"]) - expected) <= 1e-10
    # and off the graph, against the numpy objective
    off = [jnp.maximum(z + 0.1 * jnp.asarray(RNG.normal(size=z.shape)), 0) for z in xs]
    terms = objective_terms(params, off, x, y, get_penalty("relu"), lambdas, rho, layers=LAYERS)
    assert abs(float(terms["total"]) - np_objective(params, off, x, y, lambdas, rho)) <= 1e-10


def scipy_min(fun, x0, bounds=None):
    x0 = np.asarray(x0, np.float64)
    vg = jax.jit(jax.value_and_grad(lambda z: fun(z.reshape(x0.shape))))

    def f(z):
        v, g = vg(jnp.asarray(z))
        return float(v), np.asarray(g, np.float64).ravel()

    res = optimize.minimize(f, x0.ravel(), jac=True, method="L-BFGS-B", bounds=bounds,
                            options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 30})
    return res.fun, res.x.reshape(x0.shape)


@pytest.mark.parametrize("form", ["primal", "primal_mm"])
def test_conv_w_block_matches_scipy(form):
    pen = get_penalty("relu")
    spec = Conv(3, 3, pool=2)
    x_in = jnp.asarray(RNG.uniform(size=(4, 8, 8, 2)))
    x_out = jnp.asarray(np.maximum(RNG.normal(size=(4, 2, 2, 3)), 0))
    layer = spec.init(jax.random.PRNGKey(3), (8, 8, 2), jnp.float64)
    anchor = {"kernel": layer["kernel"] + 0.1, "bias": jnp.full((3,), 0.2)}
    lam, rho, rho_prox = 1.3, 1e-2, 0.2
    cfg = SolverConfig(tol=1e-10, max_steps=20000)
    p, info = blocks.solve_w_hidden(pen, spec, layer, x_in, x_out, lam, rho, cfg, anchor, rho_prox, w_mode=form)
    assert int(info.result) == Result.CONVERGED
    k_size = layer["kernel"].size

    def total(flat):
        q = {"kernel": flat[:k_size].reshape(layer["kernel"].shape), "bias": flat[k_size:]}
        u = spec.linear_map(x_in, q["kernel"]) + q["bias"]
        return (lam / 4 * jnp.sum(0.5 * x_out**2 + 0.5 * jax.nn.relu(u) ** 2 - u * x_out)
                + rho * jnp.sum(q["kernel"] ** 2)
                + rho_prox * (jnp.sum((q["kernel"] - anchor["kernel"]) ** 2)
                              + jnp.sum((q["bias"] - anchor["bias"]) ** 2)))

    flat = jnp.concatenate([p["kernel"].ravel(), p["bias"]])
    ref, _ = scipy_min(total, jnp.zeros_like(flat))
    assert abs(float(total(flat)) - ref) <= 1e-8 * abs(ref) + 1e-10
    assert float(jnp.linalg.norm(jax.grad(total)(flat))) <= 1e-7
    # the numpy objective agrees at the solution (the conv in `total` is the one under test)
    u_np = np_apply(spec, x_in, p)
    np_val = (lam / 4 * np.sum(np_relu_B(u_np, np.asarray(x_out))) + rho * np.sum(np.asarray(p["kernel"]) ** 2)
              + rho_prox * (np.sum((np.asarray(p["kernel"] - anchor["kernel"])) ** 2)
                            + np.sum(np.asarray(p["bias"] - anchor["bias"]) ** 2)))
    assert abs(np_val - float(total(flat))) <= 1e-10


def test_preconditioning_cuts_conv_w_iterations():
    pen = get_penalty("relu")
    spec = Conv(4, 3)
    x_in = jnp.asarray(RNG.uniform(size=(6, 8, 8, 2)))
    x_out = jnp.asarray(np.maximum(RNG.normal(size=(6, 6, 6, 4)), 0))
    layer = spec.init(jax.random.PRNGKey(4), (8, 8, 2), jnp.float64)
    cfg = SolverConfig(tol=1e-9, max_steps=50000)
    a, ia = blocks.solve_w_hidden(pen, spec, layer, x_in, x_out, 1.0, 1e-4, cfg, layer, 1e-3, w_mode="primal")
    b, ib = blocks.solve_w_hidden(pen, spec, layer, x_in, x_out, 1.0, 1e-4, cfg, layer, 1e-3, w_mode="primal_mm")
    assert int(ia.result) == int(ib.result) == Result.CONVERGED
    np.testing.assert_allclose(a["kernel"], b["kernel"], atol=1e-6)
    assert 3 * int(ib.steps) < int(ia.steps), (int(ib.steps), int(ia.steps))


def test_conv_x_block_matches_scipy():
    """X feeding a conv layer with pooling: the block couples pixels and channels, separable over samples."""
    pen = get_penalty("relu")
    spec = Conv(3, 3, pool=2)
    layer = spec.init(jax.random.PRNGKey(5), (8, 8, 2), jnp.float64)
    u_prev = jnp.asarray(RNG.normal(size=(3, 8, 8, 2)))
    x_next = jnp.asarray(np.maximum(RNG.normal(size=(3, 2, 2, 3)), 0))
    x0 = jnp.maximum(u_prev, 0)
    lam_prev, lam_next = 0.8, 1.7
    cfg = SolverConfig(tol=1e-10, max_steps=20000)
    x, info = blocks.solve_x_hidden(pen, x0, u_prev, spec, layer, x_next, lam_prev, lam_next, cfg)
    assert np.all(np.asarray(info.result) == Result.CONVERGED)

    def total(z):
        u = spec.linear_map(z, layer["kernel"]) + layer["bias"]
        return (lam_prev * jnp.sum(0.5 * z**2 + 0.5 * jax.nn.relu(u_prev) ** 2 - u_prev * z)
                + lam_next * jnp.sum(0.5 * x_next**2 + 0.5 * jax.nn.relu(u) ** 2 - u * x_next))

    ref, _ = scipy_min(total, x0, [(0, None)] * x0.size)
    assert float(total(x)) <= ref + 1e-8 * abs(ref) + 1e-10
    # in chunks of 2 samples (8·8·2 float64 = 1 KiB each) and a remainder of 1: the same solution
    chunked, _ = blocks.solve_x_hidden(pen, x0, u_prev, spec, layer, x_next, lam_prev, lam_next,
                                       dataclasses.replace(cfg, chunk_bytes=2 * 1024))
    np.testing.assert_allclose(chunked, x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_full_batch_bcd_on_a_tiny_cnn_never_increases_the_objective(schedule):
    x, y, params = tiny_cnn_problem(n=8, seed=1)
    lambdas, rho = (1.0, 0.5, 2.0), 1e-3
    cfg = LiftedConfig(lambdas=lambdas, rho=rho, schedule=schedule, x_tol=1e-8, x_max_steps=50, w_tol=1e-8,
                       w_max_steps=50)
    tr = LiftedTrainer(cfg, LAYERS)
    p, xs, history = tr.fit_full_batch(params, x, y, sweeps=10)
    h = np.asarray(history)
    assert np.all(np.diff(h) <= 1e-12 * np.abs(h[:-1])), np.diff(h).max()
    assert h[-1] < 0.8 * h[0]
    assert abs(np_objective(p, xs, x, y, lambdas, rho) - h[-1]) <= 1e-9 * abs(h[-1])


def test_lenet_style_run_through_the_launcher_and_warm_start_from_the_lifted_weights(tmp_path):
    config = load_config(ROOT / "configs" / "mnist_lenet5.py")
    config.update(dict(train_size=300, test_size=200, total_epochs=1, batch_size=50, objective_batch=50,
                       warm_start_lr=1e-12, progress=False))
    summary = train_and_evaluate(config, tmp_path)
    assert summary["architecture"] == "28x28x1-c6x5-p2-c16x5-p2-120-84-10"
    assert summary["warm_start_test_accuracy"] == summary["test_accuracy"]
    assert summary["test_accuracy"] > 0.3  # 6 lifted steps on 300 images: well above chance


@pytest.mark.parametrize("spec", [Dense(5, pool=2), Conv(3, 3, pool=2), Dense(5)], ids=repr)
def test_input_operator_norm_is_a_tight_upper_bound(spec):
    """‖A(·; W)‖² for one sample against numpy: the SVD of the explicit matrix of x ↦ A(x; W)."""
    shape = (8, 8, 2)
    kernel = spec.init(jax.random.PRNGKey(7), shape, jnp.float64)["kernel"]
    basis = np.eye(int(np.prod(shape))).reshape(-1, 1, *shape)
    columns = [np.asarray(spec.linear_map(jnp.asarray(e), kernel)).ravel() for e in basis]
    exact = np.linalg.svd(np.stack(columns, 1), compute_uv=False)[0] ** 2
    got = float(blocks.input_operator_norm_sq(spec, kernel, shape, 200))
    assert exact * (1 - 1e-6) <= got <= 1.05 * exact, (got, exact)
