"""Loss Change Allocation (Lan, Liu, Zhou, Dingle, Yosinski, NeurIPS 2019) of a recorded parameter path.

    python -m experiments.lca --workdir D [--max-splits 32] [--tol 1e-3] [--eval-size N] [--full]

D is a run trained with --config.record_every=k (snapshots θ_0, θ_k, θ_2k, … in D/history).
For each segment [θ_t, θ_{t+1}] with Δθ_t = θ_{t+1} − θ_t, the loss change splits over parameters:

    ΔL_t = L(θ_{t+1}) − L(θ_t) = Σ_i LCA_{t,i},   LCA_{t,i} = Δθ_{t,i} ∫₀¹ ∂_i L(θ_t + s Δθ_t) ds,

the integral by composite Simpson's rule on n sub-intervals (weights 1/6, 4/6, 1/6 of each
sub-interval's length at its start, midpoint, end), n = 1, 2, 4, … doubled while
|Σ_i LCA_{t,i} − ΔL_t| > tol, up to --max-splits. LCA_{t,i} < 0: parameter i helped (lowered L).
L is the mean softmax cross-entropy of the plain network on the first --eval-size training
examples (default: all), with no regulariser. Gradients are float32 (the trajectory's precision);
sums are accumulated in float64 numpy.

Outputs in D/lca/: lca.npz (per segment: totals, per-layer and per-neuron sums, fraction helping,
ΔL, splits, residuals), summary.json, lca_layers.png, lca_helping.png, lca_cumulative.png, and
with --full lca_full.npz (every parameter's LCA per segment, float32).
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
def allocate_path(value_and_grads, trajectory, layout: Layout, tol=1e-3, max_splits=32, full=False, log=None):
    """LCA of every segment of `trajectory` [T+1, P]; per-segment summaries (and [T, P] with full)."""
    T = trajectory.shape[0] - 1
    out = {"total": np.zeros(T), "delta_L": np.zeros(T), "residual": np.zeros(T), "splits": np.zeros(T, np.int64),
           "fraction_helping": np.zeros(T), "layer": np.zeros((T, layout.n_layers)),
           "loss": np.zeros(T + 1)}
    neurons = [np.zeros((T, w)) for w in layout.widths]
    lca_full = np.zeros((T, layout.size), np.float32) if full else None
    start = None
    for t in range(T):
        lca, splits, dL, end, residual = simpson_segment(value_and_grads, trajectory[t], trajectory[t + 1], tol,
                                                         max_splits, start=start)
        if start is None:
            out["loss"][0] = end[0] - dL
        out["loss"][t + 1] = end[0]
        start = end
        out["total"][t], out["delta_L"][t], out["residual"][t], out["splits"][t] = lca.sum(), dL, residual, splits
        out["fraction_helping"][t] = np.mean(lca < 0)
        out["layer"][t] = layout.layer_sums(lca)
        for i, s in enumerate(layout.neuron_sums(lca)):
            neurons[i][t] = s
        if full:
            lca_full[t] = lca
        if log is not None:
            log(f"segment {t + 1}/{T}: ΔL={dL:+.5f} ΣLCA−ΔL={residual:+.2e} splits={splits} "
                f"helping={100 * out['fraction_helping'][t]:.1f}%")
    out["cumulative_layer"] = np.cumsum(out["layer"], axis=0)
    for i, s in enumerate(neurons):
        out[f"neuron_layer_{i}"] = s
    return out, lca_full


def summarize(out: dict, layout: Layout, steps, tol, max_splits) -> dict:
    """Whole-path figures: reconstruction error |Σ_t Σ_i LCA − Σ_t ΔL| / |Σ_t ΔL|, per-layer totals, …"""
    total_lca, total_dL = float(np.sum(out["total"])), float(np.sum(out["delta_L"]))
    per_layer = {f"layer_{i}": float(v) for i, v in enumerate(out["layer"].sum(axis=0))}
    return {
        "n_segments": int(len(out["total"])), "steps": [int(steps[0]), int(steps[-1])],
        "n_parameters": int(layout.size), "loss_start": float(out["loss"][0]), "loss_end": float(out["loss"][-1]),
        "delta_L": total_dL, "total_lca": total_lca,
        "reconstruction_error": abs(total_lca - total_dL) / max(abs(total_dL), 1e-300),
        "max_segment_residual": float(np.max(np.abs(out["residual"]))) if len(out["residual"]) else 0.0,
        "segments_over_tol": int(np.sum(np.abs(out["residual"]) > tol)),
        "mean_fraction_helping": float(np.mean(out["fraction_helping"])),
        "per_layer_lca": per_layer, "layers_hurting": [k for k, v in per_layer.items() if v > 0],
        "splits_mean": float(np.mean(out["splits"])), "splits_max": int(np.max(out["splits"])),
        "tol": float(tol), "max_splits": int(max_splits),
    }


def write_plots(lca_dir: Path, out: dict, steps) -> list:
    """Heat map (layers × segments), % of parameters helping per segment, cumulative LCA per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.workdir import atomic_write_bytes

    start = np.asarray(steps[:-1])
    layer = out["layer"].T
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(lca_dir / name, buf.getvalue())
        written.append(lca_dir / name)

    fig, ax = plt.subplots(figsize=(max(6, 0.15 * layer.shape[1] + 3), 1 + 0.5 * layer.shape[0]))
    vmax = float(np.max(np.abs(layer))) or 1.0
    im = ax.imshow(layer, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(layer.shape[0]), [f"layer_{i}" for i in range(layer.shape[0])])
    ticks = np.unique(np.linspace(0, layer.shape[1] - 1, min(8, layer.shape[1])).astype(int))
    ax.set_xticks(ticks, [str(start[i]) for i in ticks])
    ax.set_xlabel("segment start step")
    ax.set_title("LCA per layer (blue: helped, red: hurt)")
    fig.colorbar(im, ax=ax, label="nats")
    save(fig, "lca_layers.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(start, 100 * out["fraction_helping"], marker=".")
    ax.set_xlabel("segment start step")
    ax.set_ylabel("% of parameters helping (LCA < 0)")
    save(fig, "lca_helping.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, series in enumerate(out["cumulative_layer"].T):
        ax.plot(np.asarray(steps), np.concatenate([[0.0], series]), label=f"layer_{i}")
    ax.plot(np.asarray(steps), np.concatenate([[0.0], np.cumsum(out["delta_L"])]), "k--", label="L(θ_t) − L(θ_0)")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative LCA (nats)")
    ax.legend()
    save(fig, "lca_cumulative.png")
    return written


def run_lca(workdir, tol=1e-3, max_splits=32, eval_size=None, full=False, log=None) -> dict:
    """Load D's config and history, allocate every segment, write D/lca/; returns the summary."""
    import ml_collections

    from experiments.train import Job
    from experiments.workdir import Workdir, WorkdirError, atomic_write_bytes, atomic_write_json, read_history

    began = time.perf_counter()
    max_splits = _check_splits(max_splits)
    if not tol >= 0:
        raise ValueError(f"--tol={tol} must be ≥ 0")
    wd = Workdir(workdir)
    if not wd.path.is_dir():
        raise WorkdirError(f"{wd.path} is not a directory (expected a run's workdir)")
    config = wd.read_config()
    if config is None:
        raise WorkdirError(f"{wd.config_path} not found: {wd.path} is not a run's workdir")
    steps, arrays = read_history(wd.path)
    if len(steps) == 0:
        raise WorkdirError(f"{wd.history_dir} holds no parameter history: run with --config.record_every=k")
    if len(steps) < 2:
        raise WorkdirError(f"{wd.history_dir} holds one snapshot (step {steps[0]}); LCA needs at least two: "
                           "train longer or record more often")
    try:
        layout = Layout({k: v.shape[1:] for k, v in arrays.items()})
    except ValueError as err:
        raise WorkdirError(f"{wd.history_dir}: {err}") from None
    job = Job(ml_collections.ConfigDict(config))
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
    n = int(job.x_train.shape[0])
    eval_size = n if eval_size is None else int(eval_size)
    if not 1 <= eval_size <= n:
        raise ValueError(f"--eval-size={eval_size} must be between 1 and the {n} training examples")
    loss = NetworkLoss(layout, job.layers, job.penalty, job.x_train[:eval_size].astype("float32"),
                       job.y_train[:eval_size].astype("float32"))
    out, lca_full = allocate_path(loss, trajectory, layout, tol, max_splits, full, log)
    summary = summarize(out, layout, steps, tol, max_splits)
    summary.update({"trainer": config.get("trainer"), "eval_size": eval_size,
                    "gradient_evaluations": loss.calls, "node_batch": loss.node_batch})
    lca_dir = wd.path / "lca"
    lca_dir.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, steps=np.asarray(steps, np.int64), layer_names=np.asarray([f"layer_{i}" for i in
                                                                            range(layout.n_layers)]), **out)
    atomic_write_bytes(lca_dir / "lca.npz", buf.getvalue())
    if full:
        buf = io.BytesIO()
        np.savez(buf, steps=np.asarray(steps, np.int64),
                 **{name: lca_full[:, a:b].reshape(-1, *shape) for name, a, b, shape in
                    zip(layout.names, layout.offsets, layout.offsets[1:], layout.shapes)})
        atomic_write_bytes(lca_dir / "lca_full.npz", buf.getvalue())
    write_plots(lca_dir, out, steps)
    summary["runtime_seconds"] = time.perf_counter() - began
    atomic_write_json(lca_dir / "summary.json", summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.lca", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run trained with --config.record_every=k")
    parser.add_argument("--max-splits", type=int, default=32, help="most Simpson sub-intervals (a power of 2)")
    parser.add_argument("--tol", type=float, default=1e-3, help="|Σ LCA − ΔL| per segment, nats")
    parser.add_argument("--eval-size", type=int, default=None, help="first N training examples (default: all)")
    parser.add_argument("--full", action="store_true", help="also write every parameter's LCA (lca_full.npz)")
    args = parser.parse_args(argv)
    from experiments.cli import USER_ERRORS, fail

    try:
        summary = run_lca(args.workdir, args.tol, args.max_splits, args.eval_size, args.full,
                          log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        fail("interrupted; nothing in the lca folder was left half-written")
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
                   if not isinstance(v, (dict, list))) + f" layers_hurting={summary['layers_hurting']}")


if __name__ == "__main__":
    main()
