"""Activation-based gradient-output sparsity (Sarma et al., 2021) along a recorded parameter path.

    python -m experiments.sparsity --workdir D [--eval-size 2000] [--batch-size 100]

D is a run trained with --config.record_every=k (snapshots in D/history; a history is required; of a
staircase history (record_staircase) only the snapshots after whole minibatch steps are used).
For every snapshot, on the first --eval-size training examples in batches of --batch-size, the
plain network's mean softmax cross-entropy is back-propagated and, per layer l, these are counted
(exact zeros, `== 0`, in the run's precision):

  zero output gradients   G_l = dL/dU_l == 0. Through ReLU, dL/dU_l = dL/dX_{l+1} ⊙ 1[U_l > 0], so a
                          hidden layer's G_l is zero wherever its pre-activation is ≤ 0 (jax's relu'(0) = 0).
                          The output layer's G_L = (softmax − y)/B is dense in principle; its exact zeros
                          (underflow) are counted all the same.
  zero input activations  X_l == 0 (X_0 is the data).

MAC counts. Layer l is written as a matrix product on its patch matrix Z_l = spec.patches(X_l)
(`fenchel.layers`): R rows (dense: one per sample, R = B; conv: one per sample and output position,
R = B·H_out·W_out), K columns (dense: n_in; conv: k·k·C_in), kernel W_l as K × C (C = n_out or C_out),
G_l reshaped to R × C. Folded average pooling is applied inside Z (its adds are not counted), and
SAME padding appears as zeros of Z, which are counted as zero inputs. Bias adds and bias gradients
are not MACs and are not counted. The dense MAC counts, per batch, are

  forward       U = Z W            R·K·C   (dense: N·n_in·n_out; conv: per output position k·k·C_in·C_out)
  grad-input    dZ = G Wᵀ          R·K·C   (not counted for layer 0: backprop needs no gradient of the data)
  grad-weight   dW = Zᵀ G          R·K·C

  backward = grad-input + grad-weight; forward + backward adds the forward product.

Each MAC is one (r, k, c) term of one product, and it is skippable when one of its operands is zero:

  forward       z_rk·w_kc: skippable iff z_rk = 0     → #zeros(Z)·C MACs
  grad-input    g_rc·w_kc: skippable iff g_rc = 0     → #zeros(G)·K MACs
  grad-weight   z_rk·g_rc: skippable iff z_rk = 0 or g_rc = 0 (the union, not double counted)
                → R·K·C − Σ_r nnz(Z_r)·nnz(G_r) MACs

(weight zeros are not exploited). A MAC belongs to one product only, so the per-product counts add
up to the backward and forward+backward totals without double counting. The reported "ideal
skippable fractions" are skippable / total per layer, and over the network (sums over layers).
Only exact zeros count; the count is jitted and vectorised over the samples of a batch (lax.map
over batches, int32 per batch, summed in int64 numpy).

Lifted training (operand sparsity of the X- and W-block updates). A minibatch update starts from
the forward-pass X (`fenchel.bcd`), so the zeros of X_l there are the "zero input activations"
above. The block problems touch layer l's penalty only through its u-derivative
∂_u[F(u) − c·u·v] = F'(u) − c·v, which for ReLU (F(u) = ½ relu(u)², c = 1) is the residual
relu(U_l) − X_{l+1}: the W_l block multiplies Z_lᵀ by it, the X_l block (downstream term) A_lᵀ.
Its exact zeros are where u ≤ 0 and v = 0 (an inactive unit the prox keeps at zero: both sides of
the residual vanish) or v = relu(u) > 0 (on the graph). At the forward pass every entry is on the
graph, so the residual is identically zero there (fraction 1 by construction, reported as a check):
the first X step starts from a zero residual. The informative operand is the one the W step
multiplies, after one X step of the lifted trainer from the forward pass at the snapshot's weights
(the run's lifted settings; for a run trained by another trainer the config's lifted fields, i.e.
the defaults): reported are the zero fraction of X_l after the X step, of the residual
F'(U_l) − c·X_{l+1} there (U_l recomputed from the new X_l), and of its "inactive" part
(U_l ≤ 0 and X_{l+1} = 0). The output layer's block multiplies softmax − y (dense): not reported.

Outputs in D/sparsity/: sparsity.json (per snapshot step and per layer: counts and fractions),
sparsity.png (per-layer fractions against the epoch); the final snapshot's per-layer table is
printed as Markdown.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path

import numpy as np

_NAME = re.compile(r"^layer_(\d+)/(kernel|bias)$")
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------- geometry and dense totals
def layer_geometry(layers, in_shape) -> list[dict]:
    """Per layer: rows of Z per sample (P), columns K, features C, and whether grad-input is counted."""
    import jax
    import jax.numpy as jnp

    out, shape = [], tuple(int(d) for d in in_shape)
    for i, spec in enumerate(layers):
        z = jax.eval_shape(spec.patches, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
        out.append({"index": i, "kind": spec.kind, "patch_rows_per_sample": int(z.shape[0]),
                    "K": int(z.shape[1]), "C": int(spec.features), "input_grad": i > 0,
                    "in_shape": list(shape)})
        shape = tuple(int(d) for d in spec.out_shape(shape))
    return out


def dense_macs(geometry: dict, n_samples: int) -> dict:
    """MACs of the dense products of one layer on n_samples samples (see the module docstring)."""
    r = n_samples * geometry["patch_rows_per_sample"]
    rkc = r * geometry["K"] * geometry["C"]
    return {"forward": rkc, "grad_input": rkc if geometry["input_grad"] else 0, "grad_weight": rkc}


# ---------------------------------------------------------------- counting (pure, jittable)
def product_counts(z, g, input_grad: bool = True) -> dict:
    """Skippable MACs of a layer's three products from its patch matrix z [R, K] and output gradient g [R, C].

    forward: #zeros(z)·C; grad_input: #zeros(g)·K (0 when not input_grad); grad_weight: R·K·C − Σ_r nnz(z_r)·nnz(g_r).
    Also the zero counts of z and g. Integer scalars (int32 unless x64 is on).
    """
    import jax.numpy as jnp

    r, k = z.shape
    c = g.shape[1]
    if g.shape[0] != r:
        raise ValueError(f"z has {r} rows and g {g.shape[0]}")
    nz_z = jnp.sum(z != 0, axis=1)
    nz_g = jnp.sum(g != 0, axis=1)
    z_zero = r * k - jnp.sum(nz_z)
    g_zero = r * c - jnp.sum(nz_g)
    return {"z_zero": z_zero, "g_zero": g_zero, "skip_forward": z_zero * c,
            "skip_grad_input": g_zero * k if input_grad else jnp.zeros_like(g_zero),
            "skip_grad_weight": r * k * c - jnp.sum(nz_z * nz_g)}


def _u_derivative(penalty, u, v):
    """∂_u [F(u) − c·u·v] elementwise (ReLU: relu(u) − v)."""
    import jax
    import jax.numpy as jnp

    return jax.grad(lambda uu: jnp.sum(penalty.smooth_u(uu, v)))(u)


def batch_counts(params, x0, y, layers, penalty, lifted=None) -> list[dict]:
    """Per layer, the zero and skippable-MAC counts of one batch (see the module docstring).

    penalty: the network's activation (its `forward`); lifted: a LiftedTrainer for the lifted operands (or None).
    """
    import jax
    import jax.numpy as jnp

    from fenchel.lifted import loss_per_sample, preactivation

    n = len(layers)

    def run(eps):
        inputs, us, x = [x0], [], x0
        for l in range(n):
            u = preactivation(layers[l], params[l], x) + eps[l]
            us.append(u)
            if l < n - 1:
                x = penalty.forward(u)
                inputs.append(x)
        return jnp.mean(loss_per_sample("softmax", y, us[-1])), (inputs, us)

    shapes = jax.eval_shape(lambda: run([0.0] * n)[1][1])
    eps = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    grads, (inputs, us) = jax.grad(run, has_aux=True)(eps)
    out = []
    for l, spec in enumerate(layers):
        z = spec.patches(inputs[l])
        g = grads[l].reshape(z.shape[0], -1)
        counts = product_counts(z, g, input_grad=l > 0)
        counts["x_zero"] = jnp.sum(inputs[l] == 0)
        out.append(counts)
    if lifted is not None:
        xs_after, _ = lifted._x_step(params, inputs[1:], x0, y)
        after = [x0, *xs_after]
        for l in range(n):
            out[l]["x_zero_after"] = jnp.sum(after[l] == 0)
            if l == n - 1:
                continue
            u_after = preactivation(layers[l], params[l], after[l])
            res_fwd = _u_derivative(lifted.penalty, us[l], inputs[l + 1])
            res_after = _u_derivative(lifted.penalty, u_after, after[l + 1])
            out[l]["residual_zero_forward"] = jnp.sum(res_fwd == 0)
            out[l]["residual_zero_after"] = jnp.sum(res_after == 0)
            out[l]["residual_inactive_after"] = jnp.sum((res_after == 0) & (u_after <= 0) & (after[l + 1] == 0))
    return out


def make_counter(layers, penalty, lifted=None):
    """Jitted (params, xb [nb, B, ...], yb [nb, B, k]) → per layer {name: [nb] counts}, lax.map over batches."""
    import jax

    def counter(params, xb, yb):
        return jax.lax.map(lambda xy: batch_counts(params, xy[0], xy[1], layers, penalty, lifted), (xb, yb))

    return jax.jit(counter)


# ---------------------------------------------------------------- fractions
def layer_record(counts: dict, geometry: dict, n_samples: int) -> dict:
    """Fractions (and raw int counts) of one layer from counts summed over the evaluation set."""
    c = {k: int(v) for k, v in counts.items()}
    macs = dense_macs(geometry, n_samples)
    rows = n_samples * geometry["patch_rows_per_sample"]
    x_size = n_samples * int(np.prod(geometry["in_shape"]))
    g_size = rows * geometry["C"]
    u_size = g_size  # U_l has as many entries as G_l
    bwd_total = macs["grad_input"] + macs["grad_weight"]
    bwd_skip = c["skip_grad_input"] + c["skip_grad_weight"]
    rec = {
        "layer": geometry["index"], "kind": geometry["kind"], "K": geometry["K"], "C": geometry["C"],
        "zero_output_grad": c["g_zero"] / g_size,
        "zero_input": c["x_zero"] / x_size,
        "zero_patch_entries": c["z_zero"] / (rows * geometry["K"]),
        "skip_backward": bwd_skip / bwd_total,
        "skip_forward_backward": (bwd_skip + c["skip_forward"]) / (bwd_total + macs["forward"]),
        "macs": macs, "skippable_macs": {"forward": c["skip_forward"], "grad_input": c["skip_grad_input"],
                                         "grad_weight": c["skip_grad_weight"]},
        "counts": c,
    }
    if "x_zero_after" in c:
        rec["lifted"] = {"zero_input_forward": c["x_zero"] / x_size,
                         "zero_input_after_x_step": c["x_zero_after"] / x_size}
        if "residual_zero_after" in c:
            rec["lifted"].update({"zero_residual_forward": c["residual_zero_forward"] / u_size,
                                  "zero_residual_after_x_step": c["residual_zero_after"] / u_size,
                                  "inactive_residual_after_x_step": c["residual_inactive_after"] / u_size})
    return rec


def network_record(records: list[dict]) -> dict:
    """Skippable fractions over the whole network (MAC sums over layers)."""
    tot = {k: sum(r["macs"][k] for r in records) for k in ("forward", "grad_input", "grad_weight")}
    skip = {k: sum(r["skippable_macs"][k] for r in records) for k in tot}
    bwd_t, bwd_s = tot["grad_input"] + tot["grad_weight"], skip["grad_input"] + skip["grad_weight"]
    return {"skip_backward": bwd_s / bwd_t,
            "skip_forward_backward": (bwd_s + skip["forward"]) / (bwd_t + tot["forward"]),
            "macs": tot, "skippable_macs": skip}


def markdown_table(snapshot: dict) -> str:
    """Per-layer table of one snapshot (fractions in %)."""
    lifted = any("lifted" in r for r in snapshot["layers"])
    head = ["layer", "K×C", "zero dL/dU", "zero X_l", "skip bwd MACs", "skip fwd+bwd MACs"]
    if lifted:
        head += ["zero X_l after X step", "zero residual after X step (u≤0, v=0)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(v):
        return f"{100 * v:.2f}"

    for r in snapshot["layers"]:
        row = [f"{r['layer']} ({r['kind']})", f"{r['K']}×{r['C']}", pct(r["zero_output_grad"]), pct(r["zero_input"]),
               pct(r["skip_backward"]), pct(r["skip_forward_backward"])]
        if lifted:
            lf = r.get("lifted", {})
            row.append(pct(lf["zero_input_after_x_step"]) if "zero_input_after_x_step" in lf else "–")
            row.append(f"{pct(lf['zero_residual_after_x_step'])} ({pct(lf['inactive_residual_after_x_step'])})"
                       if "zero_residual_after_x_step" in lf else "– (softmax − y)")
        lines.append("| " + " | ".join(row) + " |")
    net = snapshot["network"]
    row = ["network", "", "", "", pct(net["skip_backward"]), pct(net["skip_forward_backward"])]
    lines.append("| " + " | ".join(row + ([""] * 2 if lifted else [])) + " |")
    return "\n".join(lines)


def write_plot(path: Path, snapshots: list[dict], steps_per_epoch: int | None = None) -> None:
    """Per-layer fractions against the step (against the epoch, step / steps_per_epoch, when given): zeros of
    dL/dU and X_l, skippable MACs, lifted residual zeros."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.workdir import atomic_write_bytes

    steps = [s["step"] / (steps_per_epoch or 1) for s in snapshots]
    n_layers = len(snapshots[0]["layers"])
    lifted = "lifted" in snapshots[0]["layers"][0]
    fig, axes = plt.subplots(1, 3 if lifted else 2, figsize=(15 if lifted else 10, 4))

    def series(key, l, sub=None):
        return [100 * (s["layers"][l][sub][key] if sub else s["layers"][l][key]) for s in snapshots]

    for l in range(n_layers):
        axes[0].plot(steps, series("zero_output_grad", l), marker=".", label=f"dL/dU, layer {l}")
        axes[0].plot(steps, series("zero_input", l), marker=".", ls="--", label=f"X_{l}, layer {l}")
        axes[1].plot(steps, series("skip_backward", l), marker=".", label=f"backward, layer {l}")
        axes[1].plot(steps, series("skip_forward_backward", l), marker=".", ls="--", label=f"fwd+bwd, layer {l}")
        if lifted and "zero_residual_after_x_step" in snapshots[0]["layers"][l]["lifted"]:
            axes[2].plot(steps, series("zero_residual_after_x_step", l, "lifted"), marker=".",
                         label=f"residual, layer {l}")
            axes[2].plot(steps, series("zero_input_after_x_step", l + 1, "lifted"), marker=".", ls="--",
                         label=f"X_{l + 1} after X step")
    for ax in axes:
        ax.set_xlabel("epoch" if steps_per_epoch else "step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("% exact zeros")
    axes[1].set_ylabel("% of MACs skippable (ideal)")
    axes[0].set_title("zero output gradients / inputs")
    axes[1].set_title("skippable MACs")
    if lifted:
        axes[2].set_ylabel("% exact zeros")
        axes[2].set_title("lifted: after one X step")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------- the driver
def run_sparsity(workdir, eval_size: int = 2000, batch_size: int = 100, log=None) -> dict:
    """Load D's config and history, count every snapshot, write D/sparsity/; returns the json record."""
    import jax
    import jax.numpy as jnp

    from experiments.lca import run_config
    from experiments.train import Job, history_unit
    from experiments.trainers import lifted_config
    from experiments.workdir import WorkdirError, atomic_write_json, read_run_history
    from fenchel.bcd import LiftedTrainer

    began = time.perf_counter()
    wd, config, steps, arrays = read_run_history(workdir)
    eval_size, batch_size = int(eval_size), int(batch_size)
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be ≥ 1")
    job = Job(run_config(config))
    unit = history_unit(job.config, len(job.layers))
    if unit > 1:  # a staircase history: the snapshots after whole minibatch steps only
        keep = np.flatnonzero(np.asarray(steps) % unit == 0)
        steps, arrays = np.asarray(steps)[keep] // unit, {k: v[keep] for k, v in arrays.items()}
    n = int(job.x_train.shape[0])
    if not 1 <= eval_size <= n:
        raise ValueError(f"--eval-size={eval_size} must be between 1 and the {n} training examples")
    if eval_size % batch_size:
        raise ValueError(f"--eval-size={eval_size} must be a multiple of --batch-size={batch_size}")
    expected = {f"layer_{i}/{part}": tuple(np.shape(p[part])) for i, p in enumerate(job.params0)
                for part in ("kernel", "bias")}
    got = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
    if got != expected or any(_NAME.match(k) is None for k in got):
        raise WorkdirError(f"{wd.history_dir}: the recorded arrays {got} do not match the network of "
                           f"{wd.config_path} {expected}")
    geometry = layer_geometry(job.layers, job.in_shape)
    for g in geometry:
        if dense_macs(g, batch_size)["forward"] > _INT32_MAX:
            raise ValueError(f"--batch-size={batch_size}: layer {g['index']} has more than 2^31 MACs per batch; "
                             "use a smaller batch")
    trainer = job.trainer if isinstance(job.trainer, LiftedTrainer) else None
    lifted_source = "run" if trainer is not None else "config (run not lifted)"
    if trainer is None:
        try:
            trainer = LiftedTrainer(lifted_config(job.config), job.layers)
        except ValueError as err:  # e.g. an activation the lifted engine does not support
            trainer, lifted_source = None, f"none ({err})"
    nb = eval_size // batch_size
    dtype = job.x_train.dtype
    xb = job.x_train[:eval_size].reshape(nb, batch_size, *job.x_train.shape[1:])
    yb = job.y_train[:eval_size].reshape(nb, batch_size, -1)
    counter = make_counter(job.layers, job.penalty, trainer)
    snapshots = []
    for t, step in enumerate(steps):
        params = [{"kernel": jnp.asarray(arrays[f"layer_{i}/kernel"][t], dtype),
                   "bias": jnp.asarray(arrays[f"layer_{i}/bias"][t], dtype)} for i in range(len(job.layers))]
        if not all(bool(jnp.all(jnp.isfinite(p[k]))) for p in params for k in p):
            raise WorkdirError(f"{wd.history_dir}: the snapshot at step {step} has non-finite parameters")
        per_batch = jax.device_get(counter(params, xb, yb))
        records = [layer_record({k: np.sum(np.asarray(v, np.int64)) for k, v in layer.items()}, geometry[i], eval_size)
                   for i, layer in enumerate(per_batch)]
        snapshots.append({"step": int(step), "layers": records, "network": network_record(records)})
        if log is not None:
            net = snapshots[-1]["network"]
            log(f"step {int(step)}: skippable MACs backward {100 * net['skip_backward']:.2f}%, "
                f"forward+backward {100 * net['skip_forward_backward']:.2f}%")
    out = {"trainer": config.get("trainer"), "architecture": job.architecture, "activation": config.get("activation"),
           "eval_size": eval_size, "batch_size": batch_size, "lifted_settings": lifted_source,
           "geometry": geometry, "steps": [int(s) for s in steps], "snapshots": snapshots}
    sp_dir = wd.path / "sparsity"
    sp_dir.mkdir(exist_ok=True)
    out["steps_per_epoch"] = job.steps_per_epoch
    write_plot(sp_dir / "sparsity.png", snapshots, job.steps_per_epoch)
    out["runtime_seconds"] = time.perf_counter() - began
    atomic_write_json(sp_dir / "sparsity.json", out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.sparsity", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run trained with --config.record_every=k")
    parser.add_argument("--eval-size", type=int, default=2000, help="first N training examples (default 2000)")
    parser.add_argument("--batch-size", type=int, default=100, help="examples per evaluation batch (default 100)")
    args = parser.parse_args(argv)
    from experiments.cli import USER_ERRORS, fail

    try:
        out = run_sparsity(args.workdir, args.eval_size, args.batch_size, log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        fail("interrupted; nothing in the sparsity folder was left half-written")
    except USER_ERRORS as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    last = out["snapshots"][-1]
    print(f"{out['trainer']} {out['architecture']}, step {last['step']}, {out['eval_size']} examples "
          f"(lifted operands: {out['lifted_settings']})")
    print(markdown_table(last))


if __name__ == "__main__":
    main()
