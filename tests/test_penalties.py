"""Fenchel–Young penalties: non-negativity, zero on the graph, exact formulas, prox maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import fenchel
from fenchel.penalties import ACTIVATIONS, get_penalty

RNG = np.random.default_rng(0)
SLOPE = 0.1


def params_for(act):
    return {"negative_slope": SLOPE} if act == "leaky_relu" else {}


def make_penalty(name):
    """The penalty by test name: the four Fenchel penalties, or "lnn_relu" (LNN's squared penalty)."""
    if name == "lnn_relu":
        return get_penalty("relu", lifting="lnn")
    return get_penalty(name, **params_for(name))


ALL_PENALTIES = (*ACTIVATIONS, "lnn_relu")


def sample_domain(act, n):
    if act == "relu":
        return RNG.exponential(1.0, n)
    if act == "sigmoid":
        return RNG.uniform(0, 1, n)
    if act == "tanh":
        return RNG.uniform(-1, 1, n)
    return RNG.normal(0, 2, n)


def reference_B(act, u, v):
    """The issue's formulas, written independently in numpy."""
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)  # noqa: E731
        if act == "relu":
            return 0.5 * v**2 + 0.5 * np.maximum(u, 0) ** 2 - u * v
        if act == "leaky_relu":
            a = SLOPE
            up, um = np.maximum(u, 0), np.minimum(u, 0)
            vp, vm = np.maximum(v, 0), np.minimum(v, 0)
            return 0.5 * up**2 + a / 2 * um**2 + 0.5 * vp**2 + vm**2 / (2 * a) - u * v
        if act == "sigmoid":
            return np.logaddexp(0, u) + xlogx(v) + xlogx(1 - v) - u * v
        if act == "tanh":
            return np.log(np.cosh(u)) + 0.5 * (xlogx(1 + v) + xlogx(1 - v)) - u * v
        if act == "lnn_relu":
            return (v - u) ** 2
    raise AssertionError(act)


def reference_F(name, u):
    """F(u) in numpy: ½u₊², ½u₊² + (a/2)u₋², softplus, log cosh, u² (LNN)."""
    return {
        "relu": lambda: 0.5 * np.maximum(u, 0) ** 2,
        "leaky_relu": lambda: 0.5 * np.maximum(u, 0) ** 2 + 0.5 * SLOPE * np.minimum(u, 0) ** 2,
        "sigmoid": lambda: np.logaddexp(0, u),
        "tanh": lambda: np.logaddexp(u, -u) - np.log(2),
        "lnn_relu": lambda: u**2,
    }[name]()


def float32_near_graph(pen):
    """float32 points on and next to the graph of φ, u over ±[1e-6, 100] and 0."""
    mags = np.logspace(-6, 2, 300)
    u = jnp.asarray(np.concatenate([-mags[::-1], [0.0], mags]), jnp.float32)
    v = pen.forward(u)
    one = jnp.float32(1)
    candidates = [v, jnp.nextafter(v, one * np.inf), jnp.nextafter(v, -one * np.inf), v + jnp.float32(1e-6),
                  v - jnp.float32(1e-6), v * jnp.float32(1 + 1e-5), v * jnp.float32(1 - 1e-5)]
    us = jnp.concatenate([u] * len(candidates))
    vs = pen.project(jnp.concatenate(candidates))
    assert us.dtype == vs.dtype == jnp.float32
    return us, vs


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nonnegative_on_domain(act):
    u = RNG.normal(0, 3, 5000)
    v = sample_domain(act, 5000)
    b = np.asarray(fenchel.penalty(act, u, v, **params_for(act)))
    assert np.all(np.isfinite(b))
    assert b.min() >= -1e-12


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_zero_exactly_on_graph(act):
    pen = get_penalty(act, **params_for(act))
    u = np.linspace(-6, 6, 1001)
    on_graph = np.asarray(pen(u, pen.forward(u)))
    assert np.abs(on_graph).max() <= 1e-6
    # ...and strictly positive off the graph
    v = np.asarray(pen.project(pen.forward(u) + 0.3 * np.sign(np.sin(7 * u)) + 0.05))
    off = np.abs(v - np.asarray(pen.forward(u))) > 1e-3
    assert np.all(np.asarray(pen(u, v))[off] > 0)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_matches_reference_formula(act):
    u = RNG.normal(0, 3, 2000)
    v = sample_domain(act, 2000)
    got = np.asarray(fenchel.penalty(act, u, v, **params_for(act)))
    np.testing.assert_allclose(got, reference_B(act, u, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_G_is_the_fenchel_conjugate_of_F(act):
    """G(v) = sup_u u·v − F(u), computed by a scalar optimiser."""
    pen = get_penalty(act, **params_for(act))
    for v in sample_domain(act, 8):
        v = float(np.clip(v, -0.98, 0.98)) if act == "tanh" else float(v)
        v = float(np.clip(v, 0.02, 0.98)) if act == "sigmoid" else v
        res = optimize.minimize_scalar(lambda u: float(pen.F(u)) - u * v, bounds=(-60, 60), method="bounded",
                                       options={"xatol": 1e-12})
        np.testing.assert_allclose(float(pen.G(v)), -res.fun, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("act,boundary", [("relu", [0.0]), ("sigmoid", [0.0, 1.0]), ("tanh", [-1.0, 1.0])])
def test_finite_at_domain_boundary(act, boundary):
    u = np.linspace(-30, 30, 61)
    for vb in boundary:
        b = np.asarray(fenchel.penalty(act, u, np.full_like(u, vb)))
        assert np.all(np.isfinite(b)) and b.min() >= -1e-12


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_outside_domain_is_infinite(act):
    v = {"relu": -0.5, "sigmoid": 1.5, "tanh": -1.5}[act]
    assert np.isinf(float(fenchel.penalty(act, 0.3, v)))


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(ValueError, match="relu, leaky_relu, sigmoid, tanh"):
        fenchel.penalty("swish", 0.0, 0.0)


def test_bad_leaky_slope():
    with pytest.raises(ValueError, match="negative_slope"):
        get_penalty("leaky_relu", negative_slope=1.5)


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_nonnegative_in_float32_near_the_graph(name):
    """F(u) + G(v) − c·u·v cancels near the graph; the computed float32 value must still be ≥ 0."""
    pen = make_penalty(name)
    u, v = float32_near_graph(pen)
    b = pen.value(u, v)
    assert b.dtype == jnp.float32
    b = np.asarray(b)
    assert np.all(np.isfinite(b))
    assert b.min() >= 0.0, f"{np.sum(b < 0)} negative values, min {b.min()}"


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_float32_value_near_the_graph_is_accurate(name):
    """float32 values near the graph match a float64 numpy reference to 1e-6 (≈ 8 float32 ulps), abs. and rel."""
    pen = make_penalty(name)
    u = (np.sign(RNG.normal(size=3000)) * np.exp(RNG.uniform(np.log(1e-4), np.log(60), 3000))).astype(np.float32)
    v = np.asarray(pen.forward(jnp.asarray(u)))
    v = np.asarray(pen.project(jnp.asarray(v * (1 + 1e-3 * RNG.normal(size=3000)).astype(np.float32))))
    assert v.dtype == np.float32
    got = np.asarray(pen.value(jnp.asarray(u), jnp.asarray(v)), np.float64)
    np.testing.assert_allclose(got, reference_B(name, u.astype(np.float64), v.astype(np.float64)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_curvature_bound_is_sup_of_F_second_derivative(name):
    """curvature_u ≥ sup_u F''(u) (second differences of a numpy F on a grid), and within 1% of it."""
    pen = make_penalty(name)
    h = 1e-3
    u = np.arange(-10.0, 10.0 + h / 2, h)
    np.testing.assert_allclose(np.asarray(pen.F(jnp.asarray(u))), reference_F(name, u), rtol=1e-12, atol=1e-12)
    f = reference_F(name, u)
    second = (f[2:] - 2 * f[1:-1] + f[:-2]) / h**2
    sup = second.max()
    assert pen.curvature_u >= sup - 1e-6
    assert pen.curvature_u <= 1.01 * sup


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_derivatives_of_F_are_those_of_the_reference(name):
    """jax.grad of F (through a custom derivative for sigmoid and tanh) and its second derivative against central
    differences of the numpy F (float64), on a grid that reaches the saturated tails. A wrong custom derivative
    (σ(u/2), φ(−u), a dropped ½) moves F' by far more than the differences' O(h²)."""
    pen = make_penalty(name)
    h = 1e-4
    u = np.concatenate([np.linspace(-30.0, 30.0, 601), [0.0, 1e-3, -1e-3]]) + 0.0123  # off relu's kink at 0
    central = (reference_F(name, u + h) - reference_F(name, u - h)) / (2 * h)
    grad = jax.vmap(jax.grad(pen.F))(jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(grad), central, rtol=1e-6, atol=1e-6)
    curvature = (reference_F(name, u + h) - 2 * reference_F(name, u) + reference_F(name, u - h)) / h**2
    second = jax.vmap(jax.grad(jax.grad(pen.F)))(jnp.asarray(u))
    np.testing.assert_allclose(np.asarray(second), curvature, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_prox_of_G_is_optimal(name):
    """prox_G(z, s) = argmin_v s·G(v) + ½(v − z)², checked by a bounded scalar solve."""
    pen = make_penalty(name)
    g_ref = {"lnn_relu": lambda v: v**2}.get(name, pen.G)
    lo = max(float(pen.lower), -50.0)
    hi = min(float(pen.upper), 50.0)
    for z, s in [(-2.0, 0.5), (0.3, 0.1), (1.7, 2.0), (0.9, 1e-3), (-0.4, 10.0)]:
        got = float(pen.prox_G(jnp.asarray(z), jnp.asarray(s)))
        obj = lambda v: s * float(g_ref(v)) + 0.5 * (v - z) ** 2  # noqa: E731
        res = optimize.minimize_scalar(obj, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
        assert obj(got) <= res.fun + 1e-9
        assert lo - 1e-12 <= got <= hi + 1e-12


def test_lnn_penalty_is_2B_plus_negative_part_and_not_a_lower_bound():
    """‖v − u‖² = 2·B_relu(u, v) + min(u, 0)²: it exceeds 2B where u < 0 (not a Fenchel lower bound)."""
    u = RNG.normal(0, 2, 1000)
    v = RNG.exponential(1.0, 1000)
    lnn = np.asarray(get_penalty("relu", lifting="lnn")(u, v))
    b = np.asarray(fenchel.penalty("relu", u, v))
    np.testing.assert_allclose(lnn, 2 * b + np.minimum(u, 0) ** 2, rtol=1e-12, atol=1e-12)
    # On the graph of relu the LNN penalty is not zero where u < 0:
    on_graph = np.asarray(get_penalty("relu", lifting="lnn")(u, np.maximum(u, 0)))
    assert on_graph[u < -0.1].min() > 0


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_prox_of_G_with_short_steps_matches_a_bracketing_root_finder(act):
    """v = prox_G(z, s) solves s·φ⁻¹(v) + v = z; Newton that bounces across the root used to miss it by up to 0.9."""
    from scipy.optimize import brentq

    phi = (lambda t: 0.5 * (1 + np.tanh(t / 2))) if act == "sigmoid" else np.tanh
    pen = get_penalty(act)
    for s in (0.01, 0.03, 0.1, 0.2):
        z = np.concatenate([np.linspace(-3, 3, 601), [0.0275, 0.79386]])
        got = np.asarray(pen.prox_G(jnp.asarray(z), jnp.asarray(s)))
        ref = np.array([phi(brentq(lambda t: s * t + phi(t) - zz, (zz - 1) / s - 1, (zz + 1) / s + 1, xtol=1e-14))
                        for zz in z])
        np.testing.assert_allclose(got, ref, atol=1e-7)


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_prox_of_G_does_not_depend_on_its_start_point(act):
    """prox_G(z, s, guess) is the same root for any guess: at the domain's ends, far inside, at the answer.

    FISTA passes its previous iterate as the guess; a bracket clipped wrongly or a stopping rule that trusts
    a start point would return a guess-dependent point instead of the root (checked against brentq, float64).
    """
    from scipy.optimize import brentq

    phi = (lambda t: 0.5 * (1 + np.tanh(t / 2))) if act == "sigmoid" else np.tanh
    lo, hi = (0.0, 1.0) if act == "sigmoid" else (-1.0, 1.0)
    pen = get_penalty(act)
    rng = np.random.default_rng(3)
    z = rng.uniform(-3, 3, 400)
    s = rng.choice([1e-6, 1e-3, 0.05, 0.5, 5.0, 1e3], 400)
    ref = np.array([phi(brentq(lambda t: ss * t + phi(t) - zz, (zz - 1) / ss - 1, (zz + 1) / ss + 1, xtol=1e-14))
                    for zz, ss in zip(z, s)])
    guesses = [np.full_like(z, lo), np.full_like(z, hi), rng.uniform(lo, hi, z.shape), ref, np.full_like(z, 1e6)]
    for guess in guesses:
        got = np.asarray(pen.prox_G(jnp.asarray(z), jnp.asarray(s), jnp.asarray(guess)))
        np.testing.assert_allclose(got, ref, atol=1e-10)


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_warm_prox_of_G_returns_the_prox_and_its_root_from_any_start(act):
    """prox_G_warm(z, s, t) = (v, t′): v is the brentq prox for any start t (far on either side, at the root), and
    t′ is the root, v = φ(t′) and s·t′ + φ(t′) = z; prox_G_start(v) = φ⁻¹(v) (float64). FISTA carries t′ to its next
    call, so a t′ that is not the root (the start, or the previous call's) would make every later call slower."""
    from scipy.optimize import brentq

    phi = (lambda t: 0.5 * (1 + np.tanh(t / 2))) if act == "sigmoid" else np.tanh
    inverse = (lambda v: np.log(v / (1 - v))) if act == "sigmoid" else np.arctanh
    pen = get_penalty(act)
    rng = np.random.default_rng(4)
    z = rng.uniform(-3, 3, 300)
    s = rng.choice([1e-3, 0.05, 0.5, 5.0], 300)
    roots = np.array([brentq(lambda t: ss * t + phi(t) - zz, (zz - 1) / ss - 1, (zz + 1) / ss + 1, xtol=1e-14)
                      for zz, ss in zip(z, s)])
    for start in (np.full_like(z, -40.0), np.full_like(z, 40.0), rng.normal(0, 3, z.shape), roots):
        v, t = pen.prox_G_warm(jnp.asarray(z), jnp.asarray(s), jnp.asarray(start))
        np.testing.assert_allclose(np.asarray(v), phi(roots), atol=1e-10)
        np.testing.assert_allclose(np.asarray(t), roots, rtol=1e-8, atol=1e-8)
    v = rng.uniform(0.01, 0.99, 50) if act == "sigmoid" else rng.uniform(-0.99, 0.99, 50)
    np.testing.assert_allclose(np.asarray(pen.prox_G_start(jnp.asarray(v))), inverse(v), rtol=1e-12)


def test_root_finder_started_near_the_root_stops_in_a_few_iterations():
    """From the root: the unrolled steps only; from far away on either side: the root all the same, after more
    iterations.

    fn(t) = 0.1·t + tanh(t) − z with z = 0.1 + tanh(1), root t = 1 (by construction). The warm start is what makes
    FISTA's prox calls cheap; a stopping rule that never fires would run to max_iters every time (50 here), and
    Newton without the half-line clip bounces across the root from t = −9 (tanh is convex there).
    """
    from fenchel.penalties import UNROLLED_ROOT_STEPS, _sigmoidal_root

    z = 0.1 + np.tanh(1.0)

    def fn_and_slope(t):
        return 0.1 * t + jnp.tanh(t) - z, 0.1 + 1.0 - jnp.tanh(t) ** 2

    def bracket():
        return jnp.full(5, (z - 1) / 0.1), jnp.full(5, (z + 1) / 0.1)

    root, iters = _sigmoidal_root(fn_and_slope, bracket, jnp.ones(5), max_iters=50, with_iters=True)
    np.testing.assert_allclose(np.asarray(root), 1.0, atol=1e-12)
    assert int(iters) == UNROLLED_ROOT_STEPS  # the straight-line steps only: the loop stops at once
    near, iters_near = _sigmoidal_root(fn_and_slope, bracket, jnp.full(5, 1.001), max_iters=50, with_iters=True)
    np.testing.assert_allclose(np.asarray(near), 1.0, atol=1e-12)
    assert int(iters_near) <= 4
    for start in (-9.0, 30.0):
        far, iters_far = _sigmoidal_root(fn_and_slope, bracket, jnp.full(5, start), max_iters=50, with_iters=True)
        np.testing.assert_allclose(np.asarray(far), 1.0, atol=1e-12)
        assert int(iters_near) < int(iters_far) < 50


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_prox_of_G_from_its_own_answer_takes_few_root_iterations(act, monkeypatch):
    """Warm-started at its answer, the prox's root finder stops within 3 iterations, saturated elements included.

    With v = σ(t) ≈ 1 in float32 the root sits at one end of its bracket; a safeguard that rejects a Newton step
    landing a rounding error outside the bracket bisected for ~23 iterations on every call (the FISTA X block
    calls the prox once per iteration).
    """
    import fenchel.penalties as penalties

    counts = []
    root = penalties._sigmoidal_root

    def counting(*args, **kwargs):
        t, iters = root(*args, **{**kwargs, "with_iters": True})
        counts.append(int(iters))
        return t

    monkeypatch.setattr(penalties, "_sigmoidal_root", counting)
    pen = get_penalty(act)
    z = jnp.asarray(np.random.default_rng(0).normal(0.5, 1.5, (100, 300)), jnp.float32)  # many saturated
    s = jnp.float32(0.05)
    v = pen.prox_G(z, s)
    assert np.mean(np.abs(np.asarray(v)) > 1 - 1e-6) > 0.05  # the case is present
    again = pen.prox_G(z, s, v)
    np.testing.assert_allclose(np.asarray(again), np.asarray(v), atol=1e-6)  # float32
    assert counts[-1] <= 3, counts


DOMAINS = {"relu": (0.0, np.inf), "leaky_relu": (-np.inf, np.inf), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0),
           "lnn_relu": (0.0, np.inf)}


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_prox_of_G_with_a_zero_step_is_the_projection_onto_the_domain(name):
    """prox_G(z, 0) = argmin_{v ∈ dom G} ½(v − z)² = np.clip(z, dom G), also for s = 0 next to s > 0 (a per-neuron
    λ = 0 in an X block) and for the warm prox; catches a sigmoid/tanh prox that returns z itself outside the range."""
    pen = make_penalty(name)
    lo, hi = DOMAINS[name]
    z = np.linspace(-3.0, 3.0, 61)
    s = np.where(np.arange(z.size) % 2 == 0, 0.0, 0.5)  # s = 0 on even entries
    got = np.asarray(pen.prox_G(jnp.asarray(z), jnp.asarray(s)))
    np.testing.assert_allclose(got[s == 0], np.clip(z[s == 0], lo, hi), rtol=0, atol=1e-15)
    assert np.all((got >= lo) & (got <= hi))
    np.testing.assert_allclose(np.asarray(pen.prox_G(jnp.asarray(z), jnp.asarray(0.0))), np.clip(z, lo, hi), atol=1e-15)
    if pen.prox_G_warm is not None:
        v, _ = pen.prox_G_warm(jnp.asarray(z), jnp.asarray(s), jnp.zeros_like(jnp.asarray(z)))
        np.testing.assert_allclose(np.asarray(v)[s == 0], np.clip(z[s == 0], lo, hi), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ALL_PENALTIES)
def test_smooth_part_in_u_is_F_minus_c_u_v(name):
    """smooth_u(u, v) = F(u) − c·u·v with the numpy F and c = 1 (Fenchel), c = 2 for LNN ((v − u)² = u² + v² − 2uv),
    so ∂/∂u vanishes where F'(u) = c·v; catches a W block's fit term that drops the coupling constant c."""
    pen = make_penalty(name)
    u = RNG.normal(0, 2, 500)
    v = sample_domain("relu" if name == "lnn_relu" else name, 500)
    c = 2.0 if name == "lnn_relu" else 1.0
    got = np.asarray(pen.smooth_u(jnp.asarray(u), jnp.asarray(v)))
    np.testing.assert_allclose(got, reference_F(name, u) - c * u * v, rtol=1e-12, atol=1e-12)
