"""Loss Change Allocation (Lan, Liu, Zhou, Dingle, Yosinski, NeurIPS 2019) of a recorded parameter path.

    python -m experiments.lca --workdir D [--max-splits 32] [--tol 1e-3] [--eval-size N] [--full] [--whole-steps]

D is a run trained with --config.record_every=k (snapshots θ_0, θ_k, θ_2k, … in D/history), or a lifted run
with --config.record_staircase=True (record_every=1, alternations=1): then the history also holds, between θ_t
and θ_{t+1}, the points where the W blocks of layers 0 … k−1 have moved and the others not (a "staircase":
B = number of layers segments per minibatch step, one layer moving in each; history step (t−1)·B + k).
With alternations=1 a minibatch update is one X step (weights unchanged) and then all W blocks, each a
function of θ_t and the new X only, so these points are exactly those a block-by-block (Gauss–Seidel) W
step in the order layer 0, 1, … passes through. Segments are grouped into iterations (minibatch steps;
for record_every=k one segment each): the per-iteration figures use the LCA summed over an iteration's
segments. --whole-steps allocates a staircase history's per-step snapshots only (into D/lca_steps).
For each segment [θ_t, θ_{t+1}] with Δθ_t = θ_{t+1} − θ_t, the loss change splits over parameters:

    ΔL_t = L(θ_{t+1}) − L(θ_t) = Σ_i LCA_{t,i},   LCA_{t,i} = Δθ_{t,i} ∫₀¹ ∂_i L(θ_t + s Δθ_t) ds,

the integral by composite Simpson's rule on n sub-intervals (weights 1/6, 4/6, 1/6 of each
sub-interval's length at its start, midpoint, end), n = 1, 2, 4, … doubled while
|Σ_i LCA_{t,i} − ΔL_t| > tol, up to --max-splits. LCA_{t,i} < 0: parameter i helped (lowered L).
L is the mean softmax cross-entropy of the plain network on the first --eval-size training
examples (default: all), with no regulariser. Gradients are float32 (the trajectory's precision);
sums are accumulated in float64 numpy.

Outputs in D/lca/: lca.npz (per segment: totals, per-layer and per-neuron sums, fraction helping,
ΔL, splits, residuals, the layer that moved, for a staircase its block; per iteration (`iteration_*`):
totals, ΔL, per-layer sums, fraction helping of all parameters and of those with LCA ≠ 0),
summary.json (reconstruction error, per-layer totals, layers that hurt, layer synchrony: correlation
of the layers' per-iteration LCA, share of iterations in which all layers help), lca_layers.png,
lca_helping.png, lca_cumulative.png, and with --full lca_full.npz (every parameter's LCA per segment, float32).

    python -m experiments.lca compare F1 F2 … --out F.png      # one figure of several allocated paths
    python -m experiments.lca table F1 F2 … [--out F.md]       # one markdown table, mean ± std over seeds

`table` reads D/lca or D/lca_steps folders (summary.json, lca.npz, and the run's D/config.json), groups them by
run identity apart from the seed (the whole config but seed, progress and history_max_mb; the path kind; the
LCA settings) and writes per group: ΔL, % of parameters helping per iteration (of all, of LCA ≠ 0, first
iteration), per-layer LCA, iterations each layer hurts, layers hurting overall, layer correlation, how often all
layers help, each as mean ± sample std over the seeds, and the largest reconstruction error. A missing or
inconsistent file, two folders of one group with one seed, or one result counted twice is an error naming
the folder.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path

import numpy as np

FLOAT64 = np.float64
_NAME = re.compile(r"^layer_(\d+)/(kernel|bias)$")
_NODE_MEMORY = 512 * 2**20  # bytes of activations and gradients one vmapped gradient call may use
_CHUNK = 10000  # examples per jitted loss/gradient call


# ---------------------------------------------------------------- Simpson allocation (pure)
def _check_splits(max_splits: int) -> int:
    n = int(max_splits)
    if n < 1 or n & (n - 1):
        raise ValueError(f"max_splits={max_splits} must be a power of 2 (1, 2, 4, …)")
    return n


def _points(theta0, dtheta64, s_values, dtype):
    """θ_0 + s Δθ for each s (rows), computed in float64 and cast to the trajectory's dtype; s=0, 1 exact."""
    rows = (np.asarray(theta0, FLOAT64)[None, :] + np.asarray(s_values, FLOAT64)[:, None] * dtheta64[None, :])
    return rows.astype(dtype)


def simpson_segment(value_and_grads, theta0, theta1, tol=1e-3, max_splits=32, start=None, delta_L=None):
    """Adaptive composite Simpson LCA of one segment: LCA_i = Δθ_i Σ_k w_k ∂_i L(θ_0 + s_k Δθ).

    value_and_grads: points [k, P] → (L at each point [k], ∇L at each point [k, P]).
    With n sub-intervals (h = 1/n) the rule is h/6 [g(0) + g(1) + 2 Σ interior ends + 4 Σ midpoints];
    doubling n turns the midpoints into interior ends, so only the n new midpoints are evaluated.
    start: optional (L(θ_0), ∇L(θ_0)) already known (the previous segment's end).
    delta_L: optional ΔL to test against (default L(θ_1) − L(θ_0) from value_and_grads).
    Returns (lca [P] float64, splits, ΔL, (L(θ_1), ∇L(θ_1)), residual Σ LCA − ΔL).
    """
    max_splits = _check_splits(max_splits)
    theta0, theta1 = np.asarray(theta0), np.asarray(theta1)
    if theta0.shape != theta1.shape or theta0.ndim != 1:
        raise ValueError(f"theta0 and theta1 must be flat vectors of one shape, got {theta0.shape}, {theta1.shape}")
    dtype = np.result_type(theta0.dtype, theta1.dtype)
    dtheta = theta1.astype(FLOAT64) - theta0.astype(FLOAT64)

    def evaluate(points):
        values, grads = value_and_grads(points)
        return np.asarray(values, FLOAT64).reshape(-1), np.asarray(grads, FLOAT64).reshape(len(points), -1)

    mid = _points(theta0, dtheta, [0.5], dtype)[0]
    if start is None:
        values, grads = evaluate(np.stack([theta0.astype(dtype), theta1.astype(dtype), mid]))
        L0, g0 = values[0], grads[0]
        L1, g1, mids = values[1], grads[1], grads[2].copy()
    else:
        L0, g0 = float(start[0]), np.asarray(start[1], FLOAT64)
        values, grads = evaluate(np.stack([theta1.astype(dtype), mid]))
        L1, g1, mids = values[0], grads[0], grads[1].copy()
    dL = float(L1 - L0) if delta_L is None else float(delta_L)
    ends, inner, n = g0 + g1, np.zeros_like(g0), 1
    while True:
        lca = dtheta * ((ends + 2.0 * inner + 4.0 * mids) / (6.0 * n))
        residual = float(np.sum(lca) - dL)
        if abs(residual) <= tol or n >= max_splits:
            return lca, n, dL, (float(L1), g1), residual
        inner += mids
        n *= 2
        _, grads = evaluate(_points(theta0, dtheta, (2 * np.arange(n) + 1) / (2 * n), dtype))
        mids = grads.sum(axis=0)


def _vmapped(grad_fn, loss_fn):
    import jax

    vgrad, vloss = jax.vmap(grad_fn), jax.vmap(loss_fn)
    return lambda points: (vloss(points), vgrad(points))


def allocate_segment(grad_fn, loss_fn, theta0, theta1, tol=1e-3, max_splits=32):
    """LCA of one segment by adaptive Simpson (see `simpson_segment`); grad_fn, loss_fn: θ [P] → ∇L, L.

    Returns (lca [P] float64 with Σ lca ≈ ΔL, splits used, ΔL = L(θ_1) − L(θ_0)).
    """
    lca, splits, dL, _, _ = simpson_segment(_vmapped(grad_fn, loss_fn), theta0, theta1, tol, max_splits)
    return lca, splits, dL


def simpson_allocation(grad_fn, theta0, theta1, splits):
    """LCA_i = Δθ_i Σ_k w_k ∂_i L(θ_0 + s_k Δθ), composite Simpson on exactly `splits` sub-intervals."""
    lca, _, _, _, _ = simpson_segment(_vmapped(grad_fn, lambda th: 0.0 * th[0]), theta0, theta1,
                                      tol=-1.0, max_splits=splits, delta_L=0.0)
    return lca


def first_order_allocation(grad_fn, theta0, theta1):
    """The first-order (Euler) allocation LCA_i ≈ Δθ_i ∂_i L(θ_0)."""
    theta0 = np.asarray(theta0)
    dtheta = np.asarray(theta1, FLOAT64) - theta0.astype(FLOAT64)
    return dtheta * np.asarray(grad_fn(theta0), FLOAT64)


# ---------------------------------------------------------------- parameter layout
class Layout:
    """Flat vector ↔ per-layer {"kernel", "bias"}: layer 0's kernel, its bias, layer 1's kernel, …"""

    def __init__(self, shapes: dict):
        layers = {}
        for name, shape in shapes.items():
            match = _NAME.match(name)
            if match is None:
                raise ValueError(f"unexpected parameter name {name!r} (expected layer_<i>/kernel or layer_<i>/bias)")
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tuple(int(d) for d in shape)
        if sorted(layers) != list(range(len(layers))) or any(set(v) != {"kernel", "bias"} for v in layers.values()):
            raise ValueError(f"the parameters {sorted(shapes)} are not layer_0..layer_<n-1>, each with kernel and bias")
        self.n_layers = len(layers)
        self.names, self.shapes, self.offsets = [], [], [0]
        for i in range(self.n_layers):
            kernel, bias = layers[i]["kernel"], layers[i]["bias"]
            if len(bias) != 1 or kernel[-1] != bias[0]:
                raise ValueError(f"layer_{i}: kernel {kernel} and bias {bias} do not match")
            for part, shape in (("kernel", kernel), ("bias", bias)):
                self.names.append(f"layer_{i}/{part}")
                self.shapes.append(shape)
                self.offsets.append(self.offsets[-1] + int(np.prod(shape)))
        self.size = self.offsets[-1]
        self.widths = [layers[i]["bias"][0] for i in range(self.n_layers)]

    def flatten(self, arrays: dict, index=None) -> np.ndarray:
        """Concatenate arrays[name] (or arrays[name][index]) in layout order."""
        return np.concatenate([np.asarray(arrays[n] if index is None else arrays[n][index]).reshape(-1)
                               for n in self.names])

    def unflatten(self, flat) -> list:
        """Flat vector → [{"kernel", "bias"}, …] (jax- or numpy-traceable: static slices)."""
        parts = [flat[a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]
        return [{"kernel": parts[2 * i], "bias": parts[2 * i + 1]} for i in range(self.n_layers)]

    def layer_sums(self, lca) -> np.ndarray:
        """Per layer l: Σ_{i ∈ kernel_l ∪ bias_l} LCA_i; lca [..., P] → [..., n_layers]."""
        lca = np.asarray(lca, FLOAT64)
        bounds = self.offsets[::2]
        return np.stack([lca[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], axis=-1)

    def neuron_sums(self, lca) -> list:
        """Per layer, per output unit j: Σ_inputs LCA(kernel[..., j]) + LCA(bias[j]); each [..., width_l]."""
        lca = np.asarray(lca, FLOAT64)
        lead = lca.shape[:-1]
        out = []
        for i in range(self.n_layers):
            k0, k1, b1 = self.offsets[2 * i], self.offsets[2 * i + 1], self.offsets[2 * i + 2]
            width = self.widths[i]
            kernel = lca[..., k0:k1].reshape(*lead, -1, width).sum(-2)
            out.append(kernel + lca[..., k1:b1])
        return out


# ---------------------------------------------------------------- the network's loss on the evaluation set
class NetworkLoss:
    """points [k, P] → (L, ∇L) at each, L(θ) = (1/N) Σ_i CE(y_i, f_θ(x_i)) over the evaluation set.

    Jitted over chunks of _CHUNK examples (the last one zero-padded: a zero one-hot row adds 0 to
    the loss and its gradient) and vmapped over up to `node_batch` points; float64 sums.
    """

    def __init__(self, layout: Layout, layers, penalty, x, y, chunk: int = _CHUNK, node_batch: int | None = None):
        import jax
        import jax.numpy as jnp

        from fenchel.lifted import forward, network_loss

        self.layout, self.n = layout, int(x.shape[0])
        chunk = min(chunk, self.n)
        self.chunks = []
        for a in range(0, self.n, chunk):
            xc, yc = x[a:a + chunk], y[a:a + chunk]
            pad = chunk - xc.shape[0]
            if pad:
                xc = jnp.concatenate([xc, jnp.zeros((pad, *xc.shape[1:]), xc.dtype)])
                yc = jnp.concatenate([yc, jnp.zeros((pad, *yc.shape[1:]), yc.dtype)])
            self.chunks.append((xc, yc))
        if node_batch is None:
            params = layout.unflatten(np.zeros(layout.size, np.float32))
            xs, logits = jax.eval_shape(lambda p, x: forward(p, x, penalty, layers), params,
                                        jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.float32))
            per_example = sum(int(np.prod(a.shape)) for a in [*xs, logits])
            per_node = 4 * (4 * chunk * per_example + 3 * layout.size)
            node_batch = 1 << max(0, min(4, int(np.log2(max(1, _NODE_MEMORY // per_node)))))
        self.node_batch = int(node_batch)

        def chunk_sum(flat, xc, yc):
            return network_loss(layout.unflatten(flat), xc, yc, penalty, "softmax", layers) * xc.shape[0]

        self._fn = jax.jit(jax.vmap(jax.value_and_grad(chunk_sum), in_axes=(0, None, None)))
        self.calls = 0  # gradient evaluations (points), for the report

    def __call__(self, points):
        points = np.asarray(points, np.float32)
        k = points.shape[0]
        values, grads = np.zeros(k, FLOAT64), np.zeros((k, self.layout.size), FLOAT64)
        for a in range(0, k, self.node_batch):
            batch = points[a:a + self.node_batch]
            m = batch.shape[0]
            size = 1 << int(np.ceil(np.log2(m)))  # powers of 2 only: few compiled shapes
            if size > m:
                batch = np.concatenate([batch, np.repeat(batch[-1:], size - m, axis=0)])
            for xc, yc in self.chunks:
                v, g = self._fn(batch, xc, yc)
                values[a:a + m] += np.asarray(v, FLOAT64)[:m]
                grads[a:a + m] += np.asarray(g, FLOAT64)[:m]
        self.calls += k
        return values / self.n, grads / self.n


# ---------------------------------------------------------------- the driver
def allocate_path(value_and_grads, trajectory, layout: Layout, tol=1e-3, max_splits=32, full=False, log=None,
                  groups=None):
    """LCA of every segment of `trajectory` [T+1, P]; per-segment and per-iteration summaries (and [T, P] with full).

    groups: [T] non-decreasing iteration index of each segment (default: one iteration per segment); a
    staircase path has one segment per W block, and its iteration sums are the minibatch step's allocation.
    Per segment: total, ΔL, residual, splits, per-layer and per-neuron sums, the fraction of all parameters
    that help (LCA < 0) and of those with LCA ≠ 0, and the one layer that moved (−1: several or none).
    Per iteration (keys `iteration_*`): the same sums and fractions of the LCA summed over its segments.
    """
    T = trajectory.shape[0] - 1
    groups = np.arange(T) if groups is None else np.asarray(groups, np.int64)
    if groups.shape != (T,) or np.any(np.diff(groups) < 0):
        raise ValueError(f"groups must be a non-decreasing [T={T}] array, got shape {groups.shape}")
    labels, first = np.unique(groups, return_index=True)
    G = len(labels)
    out = {"total": np.zeros(T), "delta_L": np.zeros(T), "residual": np.zeros(T), "splits": np.zeros(T, np.int64),
           "fraction_helping": np.zeros(T), "fraction_helping_nonzero": np.zeros(T),
           "moved_layer": np.full(T, -1, np.int64), "layer": np.zeros((T, layout.n_layers)),
           "loss": np.zeros(T + 1), "iteration": labels, "iteration_segments": np.diff(np.append(first, T)),
           "iteration_total": np.zeros(G), "iteration_delta_L": np.zeros(G),
           "iteration_layer": np.zeros((G, layout.n_layers)),
           "iteration_fraction_helping": np.zeros(G), "iteration_fraction_helping_nonzero": np.zeros(G)}
    neurons = [np.zeros((T, w)) for w in layout.widths]
    lca_full = np.zeros((T, layout.size), np.float32) if full else None
    bounds = layout.offsets[::2]
    start, acc, g = None, np.zeros(layout.size), 0
    for t in range(T):
        lca, splits, dL, end, residual = simpson_segment(value_and_grads, trajectory[t], trajectory[t + 1], tol,
                                                         max_splits, start=start)
        if start is None:
            out["loss"][0] = end[0] - dL
        out["loss"][t + 1] = end[0]
        start = end
        out["total"][t], out["delta_L"][t], out["residual"][t], out["splits"][t] = lca.sum(), dL, residual, splits
        out["fraction_helping"][t] = np.mean(lca < 0)
        out["fraction_helping_nonzero"][t] = _fraction_helping_nonzero(lca)
        moved = [i for i, (a, b) in enumerate(zip(bounds, bounds[1:]))
                 if np.any(trajectory[t + 1, a:b] != trajectory[t, a:b])]
        out["moved_layer"][t] = moved[0] if len(moved) == 1 else -1
        out["layer"][t] = layout.layer_sums(lca)
        for i, s in enumerate(layout.neuron_sums(lca)):
            neurons[i][t] = s
        if full:
            lca_full[t] = lca
        acc += lca
        if t + 1 == T or groups[t + 1] != groups[t]:  # the iteration's last segment
            out["iteration_total"][g], out["iteration_layer"][g] = acc.sum(), layout.layer_sums(acc)
            out["iteration_delta_L"][g] = out["loss"][t + 1] - out["loss"][first[g]]
            out["iteration_fraction_helping"][g] = np.mean(acc < 0)
            out["iteration_fraction_helping_nonzero"][g] = _fraction_helping_nonzero(acc)
            acc, g = np.zeros(layout.size), g + 1
        if log is not None:
            log(f"segment {t + 1}/{T}: ΔL={dL:+.5f} ΣLCA−ΔL={residual:+.2e} splits={splits} "
                f"helping={100 * out['fraction_helping'][t]:.1f}% "
                f"({100 * out['fraction_helping_nonzero'][t]:.1f}% of LCA≠0)")
    out["cumulative_layer"] = np.cumsum(out["layer"], axis=0)
    for i, s in enumerate(neurons):
        out[f"neuron_layer_{i}"] = s
    return out, lca_full


def _fraction_helping_nonzero(lca) -> float:
    """Fraction of the parameters with LCA ≠ 0 that have LCA < 0 (0 when none is non-zero)."""
    nonzero = np.count_nonzero(lca)
    return float(np.sum(lca < 0) / nonzero) if nonzero else 0.0


def layer_synchrony(iteration_layer) -> dict:
    """Do layers learn in the same iterations? Pearson correlation of the per-iteration layer LCA series,
    and the share of iterations in which every layer helps against the product of each layer's share
    (what independent layers would give)."""
    x = np.asarray(iteration_layer, FLOAT64)
    helps = x < 0
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(x.T) if x.shape[0] > 1 else np.full((x.shape[1], x.shape[1]), np.nan)
    return {"layer_correlation": [[None if not np.isfinite(v) else float(v) for v in row]
                                  for row in np.atleast_2d(corr)],
            "layer_helps_share": [float(v) for v in helps.mean(axis=0)],
            "all_layers_help_share": float(np.mean(np.all(helps, axis=1))),
            "all_layers_help_if_independent": float(np.prod(helps.mean(axis=0)))}


def summarize(out: dict, layout: Layout, steps, tol, max_splits) -> dict:
    """Whole-path figures: reconstruction error |Σ_t Σ_i LCA − Σ_t ΔL| / |Σ_t ΔL|, per-layer totals, fractions
    helping per iteration, layer synchrony; `steps` are the snapshots' positions in minibatch steps."""
    total_lca, total_dL = float(np.sum(out["total"])), float(np.sum(out["delta_L"]))
    per_layer = {f"layer_{i}": float(v) for i, v in enumerate(out["layer"].sum(axis=0))}
    helping = out["iteration_fraction_helping"]
    return {
        "n_segments": int(len(out["total"])), "n_iterations": int(len(helping)),
        "steps": [float(steps[0]), float(steps[-1])],
        "n_parameters": int(layout.size), "loss_start": float(out["loss"][0]), "loss_end": float(out["loss"][-1]),
        "delta_L": total_dL, "total_lca": total_lca,
        "reconstruction_error": abs(total_lca - total_dL) / max(abs(total_dL), 1e-300),
        "max_segment_residual": float(np.max(np.abs(out["residual"]))) if len(out["residual"]) else 0.0,
        "segments_over_tol": int(np.sum(np.abs(out["residual"]) > tol)),
        "mean_fraction_helping": float(np.mean(helping)),
        "mean_fraction_helping_nonzero": float(np.mean(out["iteration_fraction_helping_nonzero"])),
        "fraction_helping_first_iteration": float(helping[0]),
        "median_fraction_helping_after_first": float(np.median(helping[1:])) if len(helping) > 1 else None,
        "per_layer_lca": per_layer, "layers_hurting": [k for k, v in per_layer.items() if v > 0],
        "iterations_layer_hurts": [int(v) for v in np.sum(out["iteration_layer"] > 0, axis=0)],
        **layer_synchrony(out["iteration_layer"]),
        "splits_mean": float(np.mean(out["splits"])), "splits_max": int(np.max(out["splits"])),
        "tol": float(tol), "max_splits": int(max_splits),
    }


def write_plots(lca_dir: Path, out: dict, steps, label: str = "") -> list:
    """Heat map (layers × iterations), % of parameters helping per iteration, cumulative LCA per layer against
    the step (`steps`: the snapshots' positions in minibatch steps; a staircase's fall between integers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.workdir import atomic_write_bytes

    steps = np.asarray(steps, FLOAT64)
    start = np.asarray(out["iteration"])
    layer = out["iteration_layer"].T
    suffix = f" — {label}" if label else ""
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(lca_dir / name, buf.getvalue())
        written.append(lca_dir / name)

    fig, ax = plt.subplots(figsize=(max(6, 0.08 * layer.shape[1] + 3), 1.2 + 0.5 * layer.shape[0]))
    vmax = float(np.max(np.abs(layer))) or 1.0
    im = ax.imshow(layer, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(layer.shape[0]), [f"layer_{i}" for i in range(layer.shape[0])])
    ticks = np.unique(np.linspace(0, layer.shape[1] - 1, min(8, layer.shape[1])).astype(int))
    ax.set_xticks(ticks, [str(start[i]) for i in ticks])
    ax.set_xlabel("iteration (start step)")
    ax.set_title("LCA per layer (blue: helped, red: hurt)" + suffix, fontsize=9)
    fig.colorbar(im, ax=ax, label="nats")
    save(fig, "lca_layers.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(start, 100 * out["iteration_fraction_helping"], marker=".", label="of all parameters")
    ax.plot(start, 100 * out["iteration_fraction_helping_nonzero"], marker=".", label="of those with LCA ≠ 0")
    ax.axhline(50, color="gray", lw=0.5)
    ax.set_xlabel("iteration (start step)")
    ax.set_ylabel("% of parameters helping (LCA < 0)")
    ax.set_title("parameters helping" + suffix, fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "lca_helping.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, series in enumerate(out["cumulative_layer"].T):
        ax.plot(steps, np.concatenate([[0.0], series]), label=f"layer_{i}")
    ax.plot(steps, np.concatenate([[0.0], np.cumsum(out["delta_L"])]), "k--", label="L(θ_t) − L(θ_0)")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative LCA (nats)")
    ax.set_title("cumulative LCA" + suffix, fontsize=9)
    ax.legend()
    save(fig, "lca_cumulative.png")
    return written


def staircase_blocks(steps, unit: int, layout: Layout, moved_layer) -> np.ndarray:
    """Block (layer) of each staircase segment, steps[t] mod unit, after checking that consecutive history steps
    differ by 1 and that no segment moves a layer other than its block; raises WorkdirError otherwise."""
    from experiments.workdir import WorkdirError

    steps = np.asarray(steps, np.int64)
    gaps = np.flatnonzero(np.diff(steps) != 1)
    if len(gaps):
        raise WorkdirError(f"staircase history: snapshot {steps[gaps[0]]} is followed by {steps[gaps[0] + 1]}, "
                           "not the next block; record it with record_every=1")
    blocks = steps[:-1] % unit
    bad = np.flatnonzero((moved_layer != blocks) & (moved_layer != -1))
    if len(bad):
        t = int(bad[0])
        raise WorkdirError(f"staircase history: the segment from history step {steps[t]} moves layer "
                           f"{moved_layer[t]}, not its block {blocks[t]}")
    return blocks


def run_config(saved: dict):
    """A run's stored config.json as a ConfigDict, fields added to the launcher since then at their defaults."""
    import json

    import ml_collections

    from configs import default as default_config

    return ml_collections.ConfigDict({**json.loads(default_config.get_config().to_json()), **saved})


EVAL_SPLITS = ("train", "test")


def run_lca(workdir, tol=1e-3, max_splits=32, eval_size=None, full=False, log=None, whole_steps=False,
            eval_split="train") -> dict:
    """Load D's config and history, allocate every segment, write D/lca/ (D/lca_steps/ with whole_steps: a
    staircase history's per-minibatch snapshots only; a `_test` suffix with eval_split="test", where L is the
    loss on held-out data, the run's test set); returns the summary."""
    from experiments.train import Job, history_unit
    from experiments.workdir import WorkdirError, atomic_write_bytes, atomic_write_json, read_run_history

    began = time.perf_counter()
    max_splits = _check_splits(max_splits)
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"--eval-split={eval_split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    if not tol >= 0:
        raise ValueError(f"--tol={tol} must be ≥ 0")
    wd, config, steps, arrays = read_run_history(workdir)
    try:
        layout = Layout({k: v.shape[1:] for k, v in arrays.items()})
    except ValueError as err:
        raise WorkdirError(f"{wd.history_dir}: {err}") from None
    unit = history_unit(config, layout.n_layers)
    if whole_steps:
        if unit == 1:
            raise ValueError(f"--whole-steps: {wd.path} holds no staircase history (record_staircase=False)")
        keep = np.flatnonzero(np.asarray(steps) % unit == 0)
        steps, arrays, unit = np.asarray(steps)[keep] // unit, {k: v[keep] for k, v in arrays.items()}, 1
    if len(steps) < 2:
        raise WorkdirError(f"{wd.history_dir} holds one snapshot (step {steps[0]}); LCA needs at least two: "
                           "train longer or record more often")
    job = Job(run_config(config))
    expected = {f"layer_{i}/{part}": tuple(np.shape(p[part])) for i, p in enumerate(job.params0)
                for part in ("kernel", "bias")}
    got = {name: shape for name, shape in zip(layout.names, layout.shapes)}
    if got != expected:
        raise WorkdirError(f"{wd.history_dir}: the recorded shapes {got} do not match the network of "
                           f"{wd.config_path} {expected}")
    trajectory = np.stack([layout.flatten(arrays, t) for t in range(len(steps))]).astype(np.float32)
    if not np.all(np.isfinite(trajectory)):
        bad = int(np.argmax(~np.all(np.isfinite(trajectory), axis=1)))
        raise WorkdirError(f"{wd.history_dir}: the snapshot at step {steps[bad]} has non-finite parameters")
    if eval_split == "train":
        x_eval, y_eval = job.x_train, job.y_train
    else:
        x_eval = np.asarray(job.data.x_test)
        y_eval = np.eye(int(job.data.num_classes), dtype=np.float32)[np.asarray(job.data.y_test)]
    n = int(x_eval.shape[0])
    eval_size = n if eval_size is None else int(eval_size)
    if not 1 <= eval_size <= n:
        raise ValueError(f"--eval-size={eval_size} must be between 1 and the {n} {eval_split} examples")
    loss = NetworkLoss(layout, job.layers, job.penalty, x_eval[:eval_size].astype("float32"),
                       y_eval[:eval_size].astype("float32"))
    steps = np.asarray(steps, np.int64)
    out, lca_full = allocate_path(loss, trajectory, layout, tol, max_splits, full, log, groups=steps[:-1] // unit)
    position = steps / unit  # minibatch steps (a staircase's inner points fall between integers)
    if unit > 1:
        out["block"] = staircase_blocks(steps, unit, layout, out["moved_layer"])
        path = f"staircase ({unit} W blocks per minibatch step, layer_0 first)"
    else:
        gap = np.unique(np.diff(steps))
        path = "every step" if gap.tolist() == [1] else f"every {', '.join(str(g) for g in gap)} steps"
    summary = summarize(out, layout, position, tol, max_splits)
    summary.update({"trainer": config.get("trainer"), "path": path, "segments_per_iteration": unit,
                    "eval_split": eval_split, "eval_size": eval_size, "gradient_evaluations": loss.calls,
                    "node_batch": loss.node_batch})
    lca_dir = wd.path / (("lca_steps" if whole_steps else "lca") + ("_test" if eval_split == "test" else ""))
    lca_dir.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, steps=steps, position=position, layer_names=np.asarray([f"layer_{i}" for i in
                                                                        range(layout.n_layers)]), **out)
    atomic_write_bytes(lca_dir / "lca.npz", buf.getvalue())
    if full:
        buf = io.BytesIO()
        np.savez(buf, steps=steps,
                 **{name: lca_full[:, a:b].reshape(-1, *shape) for name, a, b, shape in
                    zip(layout.names, layout.offsets, layout.offsets[1:], layout.shapes)})
        atomic_write_bytes(lca_dir / "lca_full.npz", buf.getvalue())
    write_plots(lca_dir, out, position, f"{config.get('trainer')}, {path}")
    summary["runtime_seconds"] = time.perf_counter() - began
    atomic_write_json(lca_dir / "summary.json", summary)
    return summary


def compare_plot(sources, out) -> Path:
    """One figure of several allocated paths (each a D/lca or D/lca_steps folder): % of parameters helping per
    iteration, cumulative LCA per layer against the step, and each layer's total LCA."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.workdir import WorkdirError, atomic_write_bytes

    runs = []
    for src in sources:
        src = Path(src)
        try:
            summary = json.loads((src / "summary.json").read_text())
            with np.load(src / "lca.npz") as z:
                data = {k: z[k] for k in ("position", "iteration", "iteration_fraction_helping", "cumulative_layer")}
        except (OSError, KeyError, ValueError) as err:
            raise WorkdirError(f"{src}: not an allocated path of this version of experiments.lca ({err}); run "
                               "python -m experiments.lca --workdir on its run first") from None
        path = "staircase" if summary.get("segments_per_iteration", 1) > 1 else summary.get("path", "")
        runs.append((f"{summary.get('trainer')}, {path}", summary, data))
    n_layers = max(d["cumulative_layer"].shape[1] for _, _, d in runs)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    styles = ["-", "--", ":", "-."]
    for c, (label, summary, d) in enumerate(runs):
        color = f"C{c}"
        axes[0].plot(d["iteration"], 100 * d["iteration_fraction_helping"], color=color, lw=1,
                     label=f"{label} (mean {100 * summary['mean_fraction_helping']:.1f}%)")
        for i, series in enumerate(d["cumulative_layer"].T):
            axes[1].plot(d["position"], np.concatenate([[0.0], series]), color=color, ls=styles[i % 4], lw=1,
                         label=f"{label}: layer_{i}")
        totals = d["cumulative_layer"][-1]
        width = 0.8 / len(runs)
        axes[2].bar(np.arange(len(totals)) + (c - (len(runs) - 1) / 2) * width, totals, width, color=color,
                    label=label)
    axes[0].axhline(50, color="gray", lw=0.5)
    axes[0].set(xlabel="iteration (minibatch step)", ylabel="% of parameters helping (LCA < 0)")
    axes[1].set(xlabel="step", ylabel="cumulative LCA (nats)")
    axes[2].set(ylabel="total LCA (nats)", xticks=range(n_layers), xticklabels=[f"layer_{i}" for i in range(n_layers)])
    axes[2].axhline(0, color="gray", lw=0.5)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    axes[2].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


# ---------------------------------------------------------------- several seeds: one table
_IDENTITY_IGNORED = ("seed", "progress", "history_max_mb")  # config fields that do not change what is allocated


def _fail_folder(src, why):
    from experiments.workdir import WorkdirError

    return WorkdirError(f"{src}: {why}")


def read_allocation(src) -> dict:
    """One allocated path (a D/lca or D/lca_steps folder) for `lca_table`: its figures recomputed in float64 from
    lca.npz, checked against summary.json, with the run's seed and identity from D/config.json.

    Raises WorkdirError naming the folder if a file is missing or unreadable, if summary.json and lca.npz
    disagree (files of two different allocations), or if the config's trainer is not the summary's."""
    import json

    src = Path(src)
    files = {name: src / name for name in ("summary.json", "lca.npz")}
    files["config.json"] = src.parent / "config.json"
    for name, path in files.items():
        if not path.is_file():
            raise _fail_folder(src, f"{path} is missing; allocate the run with python -m experiments.lca "
                                    "--workdir first" if name != "config.json" else
                               f"{path} is missing (the run's config, which holds its seed)")
    try:
        summary = json.loads(files["summary.json"].read_text())
        saved = json.loads(files["config.json"].read_text())
        with np.load(files["lca.npz"]) as z:
            data = {k: np.asarray(z[k]) for k in ("total", "delta_L", "loss", "layer", "iteration_layer",
                                                   "iteration_fraction_helping",
                                                   "iteration_fraction_helping_nonzero")}
        per_layer_summary = [float(v) for v in summary["per_layer_lca"].values()]
        summary_dL, segments = float(summary["delta_L"]), int(summary["n_segments"])
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
        raise _fail_folder(src, f"not an allocated path of this version of experiments.lca "
                                f"({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict) or "seed" not in saved:
        raise _fail_folder(src, f"{files['config.json']} holds no seed")
    layer = data["layer"].astype(FLOAT64)
    iteration_layer = data["iteration_layer"].astype(FLOAT64)
    total_lca, total_dL = float(np.sum(data["total"], dtype=FLOAT64)), float(np.sum(data["delta_L"], dtype=FLOAT64))
    per_layer = layer.sum(axis=0)
    if (len(data["total"]) != segments or len(per_layer) != len(per_layer_summary)
            or not np.allclose(per_layer, per_layer_summary, rtol=1e-9, atol=1e-12)
            or not np.isclose(total_dL, summary_dL, rtol=1e-9, atol=1e-12)):
        raise _fail_folder(src, "summary.json and lca.npz disagree (files of two different allocations?); "
                                "allocate the run again")
    if summary.get("trainer") is not None and summary.get("trainer") != saved.get("trainer"):
        raise _fail_folder(src, f"summary.json's trainer {summary.get('trainer')!r} is not the run's "
                                f"{saved.get('trainer')!r} in {files['config.json']}")
    try:
        config = run_config(saved).to_dict()
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise _fail_folder(src, f"cannot read {files['config.json']} ({type(err).__name__}: {err})") from None
    staircase = int(summary.get("segments_per_iteration", 1)) > 1
    identity = {k: v for k, v in sorted(config.items()) if k not in _IDENTITY_IGNORED}
    identity.update({"path": "staircase" if staircase else str(summary.get("path", "")),
                     "eval_split": summary.get("eval_split", "train"),  # summaries that predate it are train
                     **{k: summary.get(k) for k in ("segments_per_iteration", "eval_size", "tol", "max_splits",
                                                    "n_segments", "n_iterations")}})
    sync = layer_synchrony(iteration_layer)
    n = iteration_layer.shape[1]
    return {
        "folder": src, "seed": config["seed"], "identity": identity, "loss": data["loss"].astype(FLOAT64),
        "label": f"{config.get('trainer')}, {'staircase' if staircase else summary.get('path', '')}",
        "delta_L": total_dL,
        "helping": 100 * float(np.mean(data["iteration_fraction_helping"], dtype=FLOAT64)),
        "helping_nonzero": 100 * float(np.mean(data["iteration_fraction_helping_nonzero"], dtype=FLOAT64)),
        "helping_first": 100 * float(data["iteration_fraction_helping"][0]),
        "layer_lca": per_layer,
        "layer_hurts": np.sum(iteration_layer > 0, axis=0).astype(FLOAT64),
        "layers_hurting_overall": float(np.sum(per_layer > 0)),
        "correlation": np.array([sync["layer_correlation"][i][j] if sync["layer_correlation"][i][j] is not None
                                 else np.nan for i in range(n) for j in range(i + 1, n)], FLOAT64),
        "all_help": 100 * sync["all_layers_help_share"],
        "all_help_independent": 100 * sync["all_layers_help_if_independent"],
        "reconstruction_error": abs(total_lca - total_dL) / max(abs(total_dL), 1e-300),
        "n_iterations": int(iteration_layer.shape[0]),
    }


_STATS = ("delta_L", "helping", "helping_nonzero", "helping_first", "layer_lca", "layer_hurts",
          "layers_hurting_overall", "correlation", "all_help", "all_help_independent")


def aggregate_allocations(sources) -> list:
    """Read each folder (`read_allocation`), group them by run identity apart from the seed (the run's whole
    config but seed/progress/history_max_mb, the path kind and the LCA settings), in order of first appearance.

    Per group: label ("trainer, path"), seeds, folders, the identity fields that tell it from the other groups of
    its label, and for each figure its mean and sample standard deviation (ddof=1; NaN with one seed) over the
    seeds, float64; reconstruction_error is the maximum. Two folders of one group with the same seed, or with
    the same loss path (one result counted twice), raise WorkdirError naming both."""
    runs = [read_allocation(s) for s in sources]
    if not runs:
        raise ValueError("no folders given")
    groups = []
    for run in runs:
        group = next((g for g in groups if g["identity"] == run["identity"]), None)
        if group is None:
            groups.append(group := {"identity": run["identity"], "label": run["label"], "runs": []})
        for other in group["runs"]:
            if other["seed"] == run["seed"]:
                raise _fail_folder(run["folder"], f"has seed {run['seed']}, as does {other['folder']} of the same "
                                                  "run; each seed may appear once")
            if other["loss"].shape == run["loss"].shape and np.array_equal(other["loss"], run["loss"]):
                raise _fail_folder(run["folder"], f"has the same loss at every point as {other['folder']} "
                                                  f"(seeds {run['seed']} and {other['seed']}): one result "
                                                  "copied or mislabelled")
        group["runs"].append(run)
    keys = sorted({k for g in groups for k in g["identity"]})
    result = []
    for g in groups:
        rs = g["runs"]
        namesakes = [h for h in groups if h["label"] == g["label"]]  # groups that "trainer, path" cannot tell apart
        differing = [k for k in keys if len({json_key(h["identity"].get(k)) for h in namesakes}) > 1]
        out = {"label": g["label"], "seeds": [r["seed"] for r in rs], "folders": [str(r["folder"]) for r in rs],
               "distinct": {k: g["identity"].get(k) for k in differing}, "n_seeds": len(rs),
               "reconstruction_error": max(r["reconstruction_error"] for r in rs),
               "n_iterations": rs[0]["n_iterations"]}
        for key in _STATS:
            values = np.array([np.atleast_1d(r[key]) for r in rs], FLOAT64)
            out[key] = (values.mean(axis=0), values.std(axis=0, ddof=1) if len(rs) > 1
                        else np.full(values.shape[1], np.nan))
        result.append(out)
    return result


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _signed(x: float, fmt: str) -> str:
    return format(x, fmt).replace("-", "−")


def _mean_std(stat, fmt: str, scale: float = 1.0) -> str:
    """'m ± s' per entry, joined by ' / ' (s omitted with one seed)."""
    mean, std = stat
    return " / ".join(_signed(scale * m, fmt) + ("" if not np.isfinite(s) else f" ± {format(scale * s, fmt)}")
                      for m, s in zip(mean, std))


def lca_table(sources) -> str:
    """A markdown table of several allocated paths (D/lca or D/lca_steps folders), mean ± std over seeds per run."""
    groups = aggregate_allocations(sources)

    def header(g):
        extra = ", ".join(f"{k}={v}" for k, v in g["distinct"].items())
        return g["label"] + (f" ({extra})" if extra else "")

    n_layers = max(len(g["layer_lca"][0]) for g in groups)
    pairs = " / ".join(f"{i}–{j}" for i in range(n_layers) for j in range(i + 1, n_layers))
    rows = [
        ("seeds", lambda g: f"{g['n_seeds']} ({', '.join(str(s) for s in g['seeds'])})"),
        ("iterations", lambda g: str(g["n_iterations"])),
        ("ΔL over the run (nats)", lambda g: _mean_std(g["delta_L"], ".3f")),
        ("parameters helping per iteration, mean: % of all", lambda g: _mean_std(g["helping"], ".1f")),
        ("the same, % of those with LCA ≠ 0", lambda g: _mean_std(g["helping_nonzero"], ".1f")),
        ("the same, first iteration (% of all)", lambda g: _mean_std(g["helping_first"], ".1f")),
        ("LCA per layer, " + " / ".join(f"layer_{i}" for i in range(n_layers)) + " (nats)",
         lambda g: _mean_std(g["layer_lca"], ".3f")),
        ("iterations in which each layer hurts", lambda g: _mean_std(g["layer_hurts"], ".1f")),
        ("layers that hurt overall (per seed)", lambda g: _mean_std(g["layers_hurting_overall"], ".1f")),
        (f"correlation of per-iteration layer LCA, layers {pairs}", lambda g: _mean_std(g["correlation"], ".2f")),
        ("% of iterations in which all layers help", lambda g: _mean_std(g["all_help"], ".1f")),
        ("the same if layers were independent", lambda g: _mean_std(g["all_help_independent"], ".1f")),
        ("reconstruction error \\|Σ LCA − ΔL\\| / \\|ΔL\\|, max over seeds",
         lambda g: f"{g['reconstruction_error']:.1e}"),
    ]
    lines = ["| | " + " | ".join(header(g) for g in groups) + " |", "|---" * (len(groups) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(cell(g) for g in groups) + " |" for name, cell in rows]
    return "\n".join(lines) + "\n\nmean ± sample standard deviation (ddof=1) over the seeds.\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(prog="python -m experiments.lca compare",
                                         description=compare_plot.__doc__.splitlines()[0])
        parser.add_argument("folders", nargs="+", help="D/lca or D/lca_steps folders written by this tool")
        parser.add_argument("--out", required=True, help="the PNG to write")
        args = parser.parse_args(argv[1:])
        from experiments.cli import USER_ERRORS, fail

        try:
            print(compare_plot(args.folders, args.out))
        except USER_ERRORS as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return
    if argv[:1] == ["table"]:
        parser = argparse.ArgumentParser(prog="python -m experiments.lca table",
                                         description=lca_table.__doc__.splitlines()[0])
        parser.add_argument("folders", nargs="+", help="D/lca or D/lca_steps folders written by this tool; "
                                                       "runs that differ only in their seed are averaged")
        parser.add_argument("--out", default=None, help="also write the table to this markdown file")
        args = parser.parse_args(argv[1:])
        from experiments.cli import USER_ERRORS, fail
        from experiments.workdir import atomic_write_bytes

        try:
            text = lca_table(args.folders)
            if args.out:
                out = Path(args.out)
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out, text.encode())
        except USER_ERRORS as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        print(text, end="")
        return
    parser = argparse.ArgumentParser(prog="python -m experiments.lca", description=__doc__.splitlines()[0],
                                     epilog="python -m experiments.lca compare D1/lca D2/lca … --out F.png: "
                                            "one figure of several paths; python -m experiments.lca table "
                                            "D1/lca D2/lca … [--out F.md]: mean ± std over seeds")
    parser.add_argument("--workdir", required=True, help="a run trained with --config.record_every=k")
    parser.add_argument("--max-splits", type=int, default=32, help="most Simpson sub-intervals (a power of 2)")
    parser.add_argument("--tol", type=float, default=1e-3, help="|Σ LCA − ΔL| per segment, nats")
    parser.add_argument("--eval-size", type=int, default=None, help="first N evaluation examples (default: all)")
    parser.add_argument("--eval-split", default="train", choices=EVAL_SPLITS,
                        help="L on the training set, or on held-out data (the test set; into D/lca_test)")
    parser.add_argument("--full", action="store_true", help="also write every parameter's LCA (lca_full.npz)")
    parser.add_argument("--whole-steps", action="store_true",
                        help="staircase history: allocate only the per-minibatch-step path (into D/lca_steps)")
    args = parser.parse_args(argv)
    from experiments.cli import USER_ERRORS, fail

    try:
        summary = run_lca(args.workdir, args.tol, args.max_splits, args.eval_size, args.full,
                          log=lambda m: print(m, file=sys.stderr), whole_steps=args.whole_steps,
                          eval_split=args.eval_split)
    except KeyboardInterrupt:
        fail("interrupted; nothing in the lca folder was left half-written")
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                   if not isinstance(v, (dict, list))) + f" layers_hurting={summary['layers_hurting']}")


if __name__ == "__main__":
    main()
