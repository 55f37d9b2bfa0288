"""Fenchel–Young penalties for activation functions.

For a convex F with F' = φ, the penalty

    B_φ(u, v) = F(u) + F*(v) − u·v

is biconvex, B ≥ 0 on the domain of F*, and B = 0 exactly when v = φ(u)
(the Fenchel–Young equality). Every penalty here is written in the slightly
more general separable form

    P(u, v) = F(u) + G(v) − c·u·v,

with c = 1 and G = F* for the Fenchel penalties. The same form covers the
squared penalty of lifted neural networks (LNN, Askari et al. 2018),
‖v − u‖² with v ≥ 0, via F(u) = u², G(v) = v² + ι(v ≥ 0), c = 2; it is *not*
a Fenchel–Young penalty (it equals 2·B_relu + min(u, 0)²).

Block solvers only need: the smooth part in u (F, with curvature bound
sup F''), the proximal map of G, the domain projection and the coupling c.

Values are computed from a separate, cancellation-free form of P (the field
`divergence`: a sum of non-negative terms, or a KL divergence), since
F(u) + G(v) − c·u·v cancels near the graph and can come out negative in
float32 (times λ, a large negative "penalty").
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import xlogy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Penalty:
    """Separable biconvex penalty P(u, v) = F(u) + G(v) − c·u·v, elementwise.

    Attributes:
      name: activation name.
      forward: the activation φ, the minimiser of P(u, ·) (φ = F' for Fenchel).
      F: convex function of the pre-activation u.
      G: convex function of v on its domain (F* for Fenchel penalties).
      prox_G: (z, s, guess=None) ↦ argmin_v s·G(v) + ½(v − z)², elementwise, s ≥ 0; guess is a start
        point near the answer for the iterative proxes (sigmoid, tanh), which the answer does not depend on.
      project: Euclidean projection onto dom G.
      coupling: the constant c.
      curvature_u: sup_u F''(u), a Lipschitz constant of ∂P/∂u.
      lower: lower end of dom G (−inf if unbounded).
      upper: upper end of dom G (+inf if unbounded).
      divergence: (u, v) ↦ P(u, v) for v ∈ dom G, in a form that is ≥ 0 in floating point.
      prox_G_warm: for the iterative proxes (sigmoid, tanh; None for closed forms), (z, s, t) ↦ (v, t'): prox_G(z, s)
        by a root search for v = φ(t') started at t. An iterative solver (FISTA) carries t' to its next prox call
        instead of recovering it from v, which on XLA:CPU costs an extra log pass per call.
      prox_G_start: v ↦ φ⁻¹(v) (clipped at the ends of dom G), the start t of prox_G_warm for a given v.
    """

    name: str
    forward: Callable[[Array], Array]
    F: Callable[[Array], Array]
    G: Callable[[Array], Array]
    prox_G: Callable[[Array, Array], Array]
    project: Callable[[Array], Array]
    coupling: float
    curvature_u: float
    lower: float
    upper: float
    divergence: Callable[[Array, Array], Array]
    prox_G_warm: Optional[Callable[[Array, Array, Array], tuple[Array, Array]]] = None
    prox_G_start: Optional[Callable[[Array], Array]] = None

    def in_domain(self, v: Array) -> Array:
        """Boolean mask of v ∈ dom G."""
        return (v >= self.lower) & (v <= self.upper)

    def value(self, u: Array, v: Array) -> Array:
        """P(u, v) = F(u) + G(v) − c·u·v elementwise, via `divergence` (≥ 0); +inf where v ∉ dom G."""
        return jnp.where(self.in_domain(v), self.divergence(u, self.project(v)), jnp.inf)

    def smooth_u(self, u: Array, v: Array) -> Array:
        """The part of P smooth in u for fixed v: F(u) − c·u·v."""
        return self.F(u) - self.coupling * u * v

    def __call__(self, u: Array, v: Array) -> Array:
        return self.value(u, v)


# ---------------------------------------------------------------- scalar root
ROOT_MAX_ITERS = 60
UNROLLED_ROOT_STEPS = 2  # Newton steps before the loop (`_sigmoidal_root`)


def _sigmoidal_root(fn_and_slope, bracket, t0, max_iters: int = ROOT_MAX_ITERS, with_iters: bool = False):
    """Root of fn(t) = s·t + φ(t) − z (s ≥ 0) on the bracket [lo, hi] = bracket() by Newton's method on one
    half-line, from t0.

    fn_and_slope(t) = (fn(t), fn'(t)), fn' > 0. φ is sigmoidal: convex on t < 0 and concave on t > 0 (σ, tanh).
    The sign of fn(0) says on which side of 0 the root lies, and every iterate is clipped to that side's part of
    the bracket, where fn is convex (root ≤ 0) or concave (root ≥ 0). There Newton's method converges from any
    start: on the concave side a tangent lies above fn, so an iterate left of the root steps towards it and never
    past it, and one right of the root lands left of it (or at 0) in one step; the convex side is the mirror
    image. So after at most one step the iterates move monotonically to the root, and quadratically near it.

    The first UNROLLED_ROOT_STEPS steps are straight-line code; a `lax.while_loop` then continues until every
    element's last step was ≤ √eps·(1 + |t|) (the next would be at rounding level), or max_iters steps in all. A
    start near the root (the previous FISTA iterate) needs one or two steps, so the loop usually runs no iteration:
    on XLA:CPU each loop iteration is a separate kernel launch and a host-side test, and the two unrolled steps took
    the sigmoid and tanh lifted epochs from 1.60–1.77× to 1.37–1.61× a ReLU one
    (docs/time_to_accuracy.md, "Sigmoid and tanh speed").
    The loop carries only t: no per-element bracket or flags, so an iteration is one elementwise pass and one
    reduction. Elementwise, so it vectorises and jits. with_iters: also return the steps taken.

    bracket is a function, called inside every step: XLA then fuses the bracket's few products into each step's
    kernel instead of writing lo and hi out as two arrays per call, which took 11–17% off a sigmoid or tanh X
    step on the 2-core CPU (one process, alternating; the iterates did not change).
    """
    rtol = jnp.sqrt(jnp.finfo(jnp.result_type(t0)).eps)

    def half_line():  # the bracket's part on the root's side of 0
        lo, hi = bracket()
        root_above_0 = fn_and_slope(jnp.zeros_like(t0))[0] < 0
        return jnp.where(root_above_0, jnp.maximum(lo, 0.0), lo), jnp.where(root_above_0, hi, jnp.minimum(hi, 0.0))

    def body(carry):
        i, t, _ = carry
        lo, hi = half_line()
        f, slope = fn_and_slope(t)
        t_next = jnp.clip(t - f / slope, lo, hi)
        done = jnp.all(jnp.abs(t_next - t) <= rtol * (1.0 + jnp.abs(t_next)))
        return i + 1, t_next, done

    def cond(carry):
        return (carry[0] < max_iters) & ~carry[2]

    carry = (jnp.zeros((), jnp.int32), jnp.clip(t0, *half_line()), jnp.zeros((), bool))
    for _ in range(min(UNROLLED_ROOT_STEPS, max_iters)):  # straight-line: fused with the caller's elementwise work
        carry = body(carry)
    iters, t, _ = jax.lax.while_loop(cond, body, carry)
    return (t, iters) if with_iters else t


# ---------------------------------------------------------------- shared by sigmoid and tanh
def _with_derivative(f, df):
    """f with the derivative df: autodiff of a block's smooth part then evaluates φ = F' directly.

    Differentiating softplus or log cosh through their stable forms costs two or three transcendental passes per
    element (exp, log1p, exp); φ costs one tanh. The W blocks' fit term F(U) − c·U·X is differentiated every iteration.
    """
    g = jax.custom_jvp(f)
    g.defjvp(lambda primals, tangents: (f(primals[0]), df(primals[0]) * tangents[0]))
    return g


# ---------------------------------------------------------------- relu
def _relu_prox(z, s, guess=None):  # closed form: guess unused
    # argmin_{v ≥ 0} s·v²/2 + (v − z)²/2
    return jnp.maximum(z, 0.0) / (1.0 + s)


def _relu_divergence(u, v):
    # ½v² + ½u₊² − uv = ½(v − u₊)² + u₋·v with u₋ = max(−u, 0): both terms ≥ 0 for v ≥ 0.
    return 0.5 * (v - jax.nn.relu(u)) ** 2 + jax.nn.relu(-u) * v


def relu_penalty() -> Penalty:
    """B(u, v) = ½v² + ½relu(u)² − u·v = ½(v − u₊)² + u₋·v, v ≥ 0."""
    return Penalty(
        name="relu",
        forward=jax.nn.relu,
        F=lambda u: 0.5 * jax.nn.relu(u) ** 2,
        G=lambda v: 0.5 * v**2,
        prox_G=_relu_prox,
        project=optax.projections.projection_non_negative,
        coupling=1.0,
        curvature_u=1.0,
        lower=0.0,
        upper=jnp.inf,
        divergence=_relu_divergence,
    )


# ---------------------------------------------------------------- leaky relu
def leaky_relu_penalty(negative_slope: float = 0.01) -> Penalty:
    """B = ½u₊² + (a/2)u₋² + ½v₊² + (1/2a)v₋² − u·v, a ∈ (0, 1)."""
    a = float(negative_slope)
    if not 0.0 < a < 1.0:
        raise ValueError(f"leaky_relu needs negative_slope in (0, 1), got {a}")

    def prox(z, s, guess=None):  # closed form: guess unused
        return jnp.where(z >= 0, z / (1.0 + s), z / (1.0 + s / a))

    def divergence(u, v):
        # With x₊ = max(x, 0), x₋ = max(−x, 0): −uv = −u₊v₊ − u₋v₋ + u₊v₋ + u₋v₊, so
        # B = ½(u₊ − v₊)² + (v₋ − a·u₋)²/(2a) + u₊v₋ + u₋v₊, every term ≥ 0.
        up, um = jax.nn.relu(u), jax.nn.relu(-u)
        vp, vm = jax.nn.relu(v), jax.nn.relu(-v)
        return 0.5 * (up - vp) ** 2 + 0.5 / a * (vm - a * um) ** 2 + up * vm + um * vp

    return Penalty(
        name="leaky_relu",
        forward=lambda u: jnp.where(u >= 0, u, a * u),
        F=lambda u: 0.5 * jax.nn.relu(u) ** 2 + 0.5 * a * jnp.minimum(u, 0.0) ** 2,
        G=lambda v: 0.5 * jax.nn.relu(v) ** 2 + 0.5 / a * jnp.minimum(v, 0.0) ** 2,
        prox_G=prox,
        project=lambda v: v,
        coupling=1.0,
        curvature_u=1.0,
        lower=-jnp.inf,
        upper=jnp.inf,
        divergence=divergence,
    )


# ---------------------------------------------------------------- sigmoid
def _bernoulli_negentropy(v):
    return xlogy(v, v) + xlogy(1.0 - v, 1.0 - v)


def _bernoulli_kl(p, q, t):
    """KL(Bern(p) ‖ Bern(σ(t))) = p·(log p + softplus(−t)) + q·(log q + softplus(t)), q = 1 − p.

    q is passed in (computed by the caller from its own input) so that it is
    not rounded through 1 − p. Rounding can still leave a tiny negative value;
    it is clamped at 0, which never increases the error as the true value is ≥ 0.
    """
    kl = xlogy(p, p) + p * jax.nn.softplus(-t) + xlogy(q, q) + q * jax.nn.softplus(t)
    return jnp.maximum(kl, 0.0)


def _sigmoid_divergence(u, v):
    # softplus(u) + v log v + (1 − v) log(1 − v) − uv = KL(Bern(v) ‖ Bern(σ(u))).
    return _bernoulli_kl(v, 1.0 - v, u)


def _logit(v):
    """log(v/(1 − v)) for v ∈ [0, 1], ±large at the ends (a start point for the prox, clipped to its bracket)."""
    tiny = jnp.finfo(jnp.result_type(v)).tiny
    return jnp.log(jnp.maximum(v, tiny) / jnp.maximum(1.0 - v, tiny))


def _bounded_prox_root(z, s, t0, phi_and_slope, lower: float, upper: float):
    """(v, t): v = argmin_v s·F*(v) + ½(v − z)² for an increasing sigmoidal φ onto (lower, upper), and the root t of
    s·t + φ(t) = z, v = φ(t).

    The root lies in [(z − upper)/s, (z − lower)/s]. Newton starts from t0 (the previous FISTA iterate's root), which
    the answer does not depend on; s = 0 gives v = clip(z) (t is then meaningless).
    """
    s = jnp.asarray(s, dtype=jnp.result_type(z))
    s_safe = jnp.maximum(s, 1e-30)
    inv_s = 1.0 / s_safe  # on s's own shape (often a scalar): the brackets below are then products, cheap to fuse

    def fn_and_slope(t):
        phi, slope = phi_and_slope(t)
        return s_safe * t + phi - z, s_safe + slope

    shape = jnp.broadcast_shapes(jnp.shape(z), jnp.shape(s))

    def bracket():
        return jnp.broadcast_to((z - upper) * inv_s, shape), jnp.broadcast_to((z - lower) * inv_s, shape)

    t = _sigmoidal_root(fn_and_slope, bracket, jnp.broadcast_to(t0, shape))
    return jnp.where(s > 0, phi_and_slope(t)[0], jnp.clip(z, lower, upper)), t


def _bounded_prox(z, s, guess, phi_and_slope, inverse, lower: float, upper: float):
    """`_bounded_prox_root`'s v, started from inverse(guess) (guess None: clip(z), the answer as s → 0)."""
    v0 = jnp.clip(z if guess is None else jnp.broadcast_to(guess, jnp.shape(z)), lower, upper)
    return _bounded_prox_root(z, s, inverse(v0), phi_and_slope, lower, upper)[0]


def _sigmoid_and_slope(t):
    """(σ(t), σ'(t)) as ½(1 + h), ¼(1 − h²) with h = tanh(t/2): one tanh, which XLA:CPU evaluates faster than its
    logistic (an absolute error of a few ulp of 1 where σ(t) is tiny, which the prox's tolerance allows)."""
    h = jnp.tanh(0.5 * t)
    return 0.5 + 0.5 * h, 0.25 * (1.0 - h * h)


def _sigmoid_prox(z, s, guess=None):
    """v = σ(t) with s·t + σ(t) = z (`_bounded_prox`)."""
    return _bounded_prox(z, s, guess, _sigmoid_and_slope, _logit, 0.0, 1.0)


def _sigmoid_prox_warm(z, s, t):
    """(v, t') with v = σ(t'), s·t' + σ(t') = z, from the start t (`_bounded_prox_root`)."""
    return _bounded_prox_root(z, s, t, _sigmoid_and_slope, 0.0, 1.0)


def sigmoid_penalty() -> Penalty:
    """B = log(1 + eᵘ) + v log v + (1 − v) log(1 − v) − u·v, v ∈ [0, 1]."""
    return Penalty(
        name="sigmoid",
        forward=jax.nn.sigmoid,
        F=_with_derivative(jax.nn.softplus, lambda u: _sigmoid_and_slope(u)[0]),
        G=_bernoulli_negentropy,
        prox_G=_sigmoid_prox,
        project=lambda v: optax.projections.projection_box(v, 0.0, 1.0),
        coupling=1.0,
        curvature_u=0.25,
        lower=0.0,
        upper=1.0,
        divergence=_sigmoid_divergence,
        prox_G_warm=_sigmoid_prox_warm,
        prox_G_start=lambda v: _logit(jnp.clip(v, 0.0, 1.0)),
    )


# ---------------------------------------------------------------- tanh
def _log_cosh(u):
    a = jnp.abs(u)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - jnp.log(2.0)


def _tanh_conj(v):
    return 0.5 * (xlogy(1.0 + v, 1.0 + v) + xlogy(1.0 - v, 1.0 - v))


def _tanh_divergence(u, v):
    # With p = (1 + v)/2 and tanh(u) = 2σ(2u) − 1: log cosh u = softplus(2u) − u − log 2 and
    # F*(v) = p log p + (1 − p) log(1 − p) + log 2, so B_tanh(u, v) = B_sigmoid(2u, p)
    # = KL(Bern(p) ‖ Bern(σ(2u))).
    return _bernoulli_kl(0.5 * (1.0 + v), 0.5 * (1.0 - v), 2.0 * u)


def _tanh_and_slope(t):
    th = jnp.tanh(t)
    return th, 1.0 - th * th


def _atanh(v):
    """atanh(v) = ½ logit((1 + v)/2) for v ∈ [−1, 1], ±large at the ends."""
    return 0.5 * _logit(0.5 * (1.0 + jnp.clip(v, -1.0, 1.0)))


def _tanh_prox(z, s, guess=None):
    """v = tanh(t) with s·t + tanh(t) = z (`_bounded_prox`)."""
    return _bounded_prox(z, s, guess, _tanh_and_slope, _atanh, -1.0, 1.0)


def _tanh_prox_warm(z, s, t):
    """(v, t') with v = tanh(t'), s·t' + tanh(t') = z, from the start t (`_bounded_prox_root`)."""
    return _bounded_prox_root(z, s, t, _tanh_and_slope, -1.0, 1.0)


def tanh_penalty() -> Penalty:
    """B = log cosh u + ½[(1+v)log(1+v) + (1−v)log(1−v)] − u·v, v ∈ [−1, 1]."""
    return Penalty(
        name="tanh",
        forward=jnp.tanh,
        F=_with_derivative(_log_cosh, jnp.tanh),
        G=_tanh_conj,
        prox_G=_tanh_prox,
        project=lambda v: optax.projections.projection_box(v, -1.0, 1.0),
        coupling=1.0,
        curvature_u=1.0,
        lower=-1.0,
        upper=1.0,
        divergence=_tanh_divergence,
        prox_G_warm=_tanh_prox_warm,
        prox_G_start=_atanh,
    )


# ---------------------------------------------------------------- LNN
def lnn_relu_penalty() -> Penalty:
    """LNN's squared penalty ‖v − u‖², v ≥ 0 (forward map relu); not a lower bound."""

    def prox(z, s, guess=None):  # closed form: guess unused
        # argmin_{v ≥ 0} s·v² + ½(v − z)²
        return jnp.maximum(z, 0.0) / (1.0 + 2.0 * s)

    return Penalty(
        name="lnn_relu",
        forward=jax.nn.relu,
        F=lambda u: u**2,
        G=lambda v: v**2,
        prox_G=prox,
        project=optax.projections.projection_non_negative,
        coupling=2.0,
        curvature_u=2.0,
        lower=0.0,
        upper=jnp.inf,
        divergence=lambda u, v: (v - u) ** 2,
    )


_FACTORIES = {
    "relu": relu_penalty,
    "leaky_relu": leaky_relu_penalty,
    "sigmoid": sigmoid_penalty,
    "tanh": tanh_penalty,
}

ACTIVATIONS = tuple(_FACTORIES)


def get_penalty(activation: str, lifting: str = "fenchel", **params) -> Penalty:
    """The penalty for `activation` ("relu", "leaky_relu", "sigmoid", "tanh").

    lifting="fenchel" gives the Fenchel–Young penalty B_φ; lifting="lnn" gives
    the squared LNN penalty (relu only).
    """
    if lifting == "lnn":
        if activation != "relu":
            raise ValueError(f"lifting='lnn' supports only activation='relu', got {activation!r}")
        if params:
            raise ValueError(f"lnn_relu takes no parameters, got {sorted(params)}")
        return lnn_relu_penalty()
    if lifting != "fenchel":
        raise ValueError(f"unknown lifting {lifting!r}; known: 'fenchel', 'lnn'")
    if activation not in _FACTORIES:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    try:
        return _FACTORIES[activation](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters {params} for activation {activation!r}: {err}") from None


def activation_penalty(activation: str, negative_slope: float = 0.01, lifting: str = "fenchel") -> Penalty:
    """The penalty of a network's activation; negative_slope is used by leaky_relu only."""
    params = {"negative_slope": negative_slope} if activation == "leaky_relu" else {}
    return get_penalty(activation, lifting, **params)


def penalty(activation: str, u: Array, v: Array, **params) -> Array:
    """Elementwise Fenchel–Young penalty B_φ(u, v) = F(u) + F*(v) − u·v.

    +inf where v lies outside the domain of F*. `params` go to the activation
    (e.g. negative_slope for leaky_relu).
    """
    return get_penalty(activation, **params).value(jnp.asarray(u), jnp.asarray(v))
