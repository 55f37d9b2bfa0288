"""Benchmark suite: lifted training against Adam, block costs, cost curves, memory, and sharded overhead.

    python -m experiments.bench --json runs/bench.json            # the full suite (CPU: about 10 minutes)
    python -m experiments.bench --quick --json runs/bench.json    # fewer sizes and repetitions

Every time is the median of several calls after a warm-up call, synchronised with `block_until_ready`;
compile time (first call minus median) is reported separately. Sections (`--sections`):

  epoch    one Adam epoch, one lifted minibatch epoch (batch 100) and one full-batch lifted sweep, for MNIST
           784-300-10, 784-300-100-10 and LeNet-5, in one run; MLP epochs are run whole through the shared
           epoch loop, LeNet-5's are median step × steps per epoch; the lifted and Adam calls (steps, and the
           MLPs' epochs) alternate, so both see the same machine. JSON: `lifted_over_adam_epoch`
           (784-300-10, whole epochs) and the per-architecture ratios.
  activations  whole epochs (784-300-10, `--activation-samples` images) of lifted and Adam training with each
           activation, in one run, as ratios to the ReLU lifted epoch (JSON: `activations`).
  blocks   each block of a 784-300-100-10 minibatch update: median time at the default iteration budget and
           the iterations each needs to reach its tolerance (budget raised to 1000).
  layers   equal-width hidden W blocks through LiftedTrainer, stack_layers off (a list) and on (stacked, vmapped).
  retry    the W blocks' non-finite retry (`w_retry`) on and off: the 784-300-10 step at 10 / 3 and 3 / 2 against
           Adam's (`--budget-steps` steps per call), and the layers section's W step and update (JSON: `retry`).
           Not in a plain run: name it in `--sections`.
  curves   time per full-batch sweep of 784-300-10 against samples (1k … 60k) and of 784-W-10 against width
           W (100 … 4000), with fitted growth exponents (least squares on log time against log size).
  fullbatch  full-batch BCD of 784-300-10 on `--fullbatch-samples` images with each dense W form for more samples
           than inputs (primal: FISTA with step 1/L; primal_mm: preconditioned by the (n_in + 1)² majoriser, the
           "auto" choice) and with the X blocks whole or in cache-sized chunks (`x_chunk_bytes`): time per sweep
           (the variants alternating) and the lifted objective F after each of `--fullbatch-sweeps` sweeps.
  budgets  the cost of the lifted minibatch step against its iteration budgets (784-300-10, batch 100): from one
           state trained for `--budget-warm-steps` steps, `--budget-steps` steps with each (x_max_steps,
           w_max_steps) of `--budget-grid`, alternating with Adam's steps from its own state trained as long;
           each as a ratio to Adam's step, and a least-squares fit step = fixed + a·x_max_steps + b·w_max_steps
           (JSON: `budgets`). The fixed part bounds from below what any budget can cost.
  devices  the data-parallel minibatch step and full-batch sweep (`fenchel.sharding`) on 1, 2, 4 and 8
           forced host devices (each count in a subprocess with XLA_FLAGS set), as overhead ratios.
  model    the same for a wide network, 784-`--model-width`-10, on data × model meshes (`--meshes`; hidden neurons
           split over the model axis): step and sweep times as ratios to one device, and the bytes of the
           trainer state each device holds.
  memory   peak host RSS of this process, and device peak memory where the backend reports it.
--x-steps/--w-steps set the lifted trainers' iterations per X/W block (x_max_steps, w_max_steps; default: the
configs', 10 and 3) in the epoch and activations sections, e.g. 3 and 2 for the settings of
configs/mnist_mlp_momentum_fast.py and configs/mnist_lenet5_momentum_fast.py.
On a GPU the epoch section adds the achieved FLOP/s of the full-batch sweep (an estimate from the GEMMs at
full iteration budgets) against a measured float32 matmul peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import mnist_lenet5, mnist_mlp
from experiments import loop
from experiments.train import Job
from fenchel import LiftedConfig, LiftedTrainer, init_params, mlp
from fenchel.penalties import ACTIVATIONS

ARCHITECTURES = {"784-300-10": "dense:300", "784-300-100-10": "dense:300,dense:100",
                 "lenet5": mnist_lenet5.get_config().layers}
SECTIONS = ("epoch", "activations", "blocks", "budgets", "layers", "retry", "curves", "fullbatch", "devices",
            "model", "memory")
# sections a plain run leaves out: diagnostics of one setting, not the issue's benchmark table
NOT_DEFAULT = frozenset({"retry"})
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s not in NOT_DEFAULT)
# the layers and retry sections' network: this many equal hidden layers of this width (784-300-300-300-300-10)
EQUAL_DEPTH, EQUAL_WIDTH = 4, 300
# the fullbatch section's variants: (W form for N > n_in, x_chunk_bytes); the last is the default
FULLBATCH_VARIANTS = (("primal", -1), ("primal_mm", 0), ("primal_mm", -1))


def timed(fn, *args, reps: int = 5) -> dict:
    """{"median_s", "compile_s", "reps"}: median wall time of fn(*args) after one warm-up call."""
    return timed_alternating({"": (fn, args)}, reps)[""]


def timed_alternating(calls: dict, reps: int = 5) -> dict:
    """`timed` for several {label: (fn, args)} at once, their calls alternating (one of each per round).

    On a shared or noisy machine whose speed drifts over minutes, alternating keeps the ratio of two medians
    to what one moment's machine gives, where timing one function after the other does not.
    """
    first = {}
    for label, (fn, args) in calls.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[label] = time.perf_counter() - t
    times = {label: [] for label in calls}
    for _ in range(reps):
        for label, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[label].append(time.perf_counter() - t)
    out = {}
    for label, ts in times.items():
        median = statistics.median(ts)
        out[label] = {"median_s": median, "compile_s": max(first[label] - median, 0.0), "reps": reps}
    return out


def growth_exponent(sizes, seconds) -> float:
    """Slope of log(seconds) against log(size) by least squares: time ∝ size^exponent."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)[0])


def lifted_iterations(args) -> dict:
    """The lifted trainers' iteration overrides (--x-steps, --w-steps), as config fields."""
    fields = {"x_max_steps": args.x_steps, "w_max_steps": args.w_steps}
    return {key: value for key, value in fields.items() if value is not None}


def linear_cost_fit(budgets, seconds) -> dict:
    """Least-squares fit of seconds ≈ fixed + per_x·x + per_w·w over the (x, w) iteration budgets."""
    a = np.column_stack([np.ones(len(budgets)), np.asarray(budgets, float)])
    coef = np.linalg.lstsq(a, np.asarray(seconds, float), rcond=None)[0]
    return {"fixed_s": float(coef[0]), "per_x_iteration_s": float(coef[1]), "per_w_iteration_s": float(coef[2])}


def parse_budget_grid(text: str) -> list:
    """"1/1,10/3" → [(1, 1), (10, 3)]: (x_max_steps, w_max_steps) pairs, each ≥ 1."""
    grid = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"budget {item!r}: expected X/W with two integers ≥ 1, e.g. 10/3")
        grid.append((int(parts[0]), int(parts[1])))
    if np.linalg.matrix_rank(np.column_stack([np.ones(len(grid)), np.asarray(grid, float)])) < 3:
        raise ValueError(f"--budget-grid {text!r}: fitting a fixed, a per-X and a per-W cost needs budgets that vary "
                         "X and W independently (e.g. 1/1,1/3,10/1)")
    return grid


def _job(layers: str, trainer: str, train_size: int = 0, **fields):
    base = mnist_lenet5.get_config() if layers == ARCHITECTURES["lenet5"] else mnist_mlp.get_config()
    base.update(dict(layers=layers, trainer=trainer, progress=False, train_size=train_size, test_size=100, **fields))
    return Job(base)


def _epoch_seconds(jobs: dict, reps: int) -> dict:
    """{label: [seconds of each timed epoch]}: one warm-up epoch per job, then `reps` rounds of one epoch of each
    job in turn (alternating, as in `timed_alternating`)."""
    states = {label: job.trainer.init(job.params0) for label, job in jobs.items()}
    for label, job in jobs.items():  # warm-up: compiles the step
        loop.run_epoch(job.trainer, states[label], job.x_train, job.y_train, seed=0, epoch=0, batch_size=100)
    seconds = {label: [] for label in jobs}
    for e in range(reps):
        for label, job in jobs.items():
            result = loop.run_epoch(job.trainer, states[label], job.x_train, job.y_train, seed=0, epoch=e + 1,
                                    batch_size=100)[1]
            seconds[label].append(result.seconds)
    return seconds


def _sweep_gemm_flops(layers, n: int, in_dim: int, config: LiftedConfig) -> float:
    """GEMM FLOPs of one full-batch sweep of a dense network at full iteration budgets: per FISTA iteration
    each X block and each W block multiplies by its weights twice (value and gradient), 2·2·N·n_in·n_out."""
    sizes = [in_dim, *[layer.features for layer in layers]]
    per_layer = [4.0 * n * a * b for a, b in zip(sizes[:-1], sizes[1:])]
    x_work = sum(per_layer[1:]) * config.x_max_steps  # X_l's iterations multiply by W_l (the next layer)
    w_work = sum(per_layer) * config.w_max_steps
    return x_work + w_work + sum(per_layer) / 2  # + the forward pass that the objective needs


def _matmul_peak(n: int = 8192) -> dict:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    out = {}
    for precision in ("default", "highest"):
        fn = jax.jit(lambda p, q, precision=precision: jnp.matmul(p, q, precision=precision))
        out[f"float32_{precision}_flops"] = 2.0 * n**3 / timed(fn, a, a, reps=5)["median_s"]
    return out


def section_epoch(args, out: dict) -> None:
    rows = {}
    for name, layers in ARCHITECTURES.items():
        conv = name == "lenet5"
        lifted, adam = _job(layers, "fenchel", **lifted_iterations(args)), _job(layers, "adam")
        x, y = lifted.x_train, lifted.y_train
        steps = lifted.steps_per_epoch
        row = {"steps_per_epoch": steps}
        jobs = {"lifted": lifted, "adam": adam}
        calls = {label: (job.trainer.step, (job.trainer.init(job.params0), x[:100], y[:100]))
                 for label, job in jobs.items()}
        for label, t in timed_alternating(calls, reps=args.reps).items():
            row[f"{label}_step"] = t
            row[f"{label}_epoch_from_steps_s"] = t["median_s"] * steps
        if not conv and not args.quick:
            for label, seconds in _epoch_seconds(jobs, args.epoch_reps).items():
                row[f"{label}_epoch_s"] = statistics.median(seconds)
        n_sweep = min(args.lenet_sweep_samples if conv else args.sweep_samples, x.shape[0])
        tr: LiftedTrainer = lifted.trainer
        x0, y0 = x[:n_sweep], y[:n_sweep]
        xs = tr.forward(lifted.params0, x0)
        row["sweep_samples"] = n_sweep
        row["sweep"] = timed(tr.sweep, lifted.params0, xs, x0, y0, reps=max(2, args.reps // 2))
        key = "epoch_s" if "lifted_epoch_s" in row else "epoch_from_steps_s"
        row["lifted_over_adam_epoch"] = row[f"lifted_{key}"] / row[f"adam_{key}"]
        row["sweep_over_adam_epoch"] = row["sweep"]["median_s"] / row[f"adam_{key}"]
        row["ratio_from"] = "whole epochs" if key == "epoch_s" else "median step × steps per epoch"
        if jax.devices()[0].platform == "gpu" and not conv:
            flops = _sweep_gemm_flops(lifted.layers, n_sweep, x.shape[1], tr.config)
            row["sweep_gemm_flops_estimate"] = flops
            row["sweep_achieved_flops"] = flops / row["sweep"]["median_s"]
        rows[name] = row
        print(f"  {name}: lifted/adam epoch {row['lifted_over_adam_epoch']:.2f}x ({row['ratio_from']}), "
              f"sweep of {n_sweep} samples {row['sweep']['median_s']:.3f} s", flush=True)
    out["epoch"] = rows
    out["lifted_over_adam_epoch"] = rows["784-300-10"]["lifted_over_adam_epoch"]
    if jax.devices()[0].platform == "gpu":
        out["matmul_peak"] = _matmul_peak()


def section_blocks(args, out: dict) -> None:
    job = _job(ARCHITECTURES["784-300-100-10"], "fenchel")
    tr: LiftedTrainer = job.trainer
    x, y, params = job.x_train[:100], job.y_train[:100], job.params0
    c = tr.config
    long = LiftedTrainer(dataclasses.replace(c, x_max_steps=1000, w_max_steps=1000), tr.layers)
    rows = []
    xs = list(tr.forward(params, x))
    for l in range(tr.n_layers - 1, 0, -1):  # the sequential schedule's order, each on the X it would see
        t = timed(tr.x_block, l, params, xs, x, y, reps=args.reps)
        to_tol = int(long.x_block(l, params, xs, x, y)[1].steps.max())
        xs[l - 1], info = tr.x_block(l, params, xs, x, y)
        rows.append({"block": f"X_{l}", "median_s": t["median_s"], "compile_s": t["compile_s"],
                     "steps": int(info.steps.max()), "budget": c.x_max_steps, "steps_to_tol": to_tol})
    for l in range(tr.n_layers):
        fn = jax.jit(lambda p, z, l=l: tr.w_block(l, p, z, x, y, p, anchor_is_start=True))
        t = timed(fn, params, xs, reps=args.reps)
        info = fn(params, xs)[1]
        to_tol = int(long.w_block(l, params, xs, x, y, params, anchor_is_start=True)[1].steps)
        form = tr.layers[l].w_form(c.w_mode, ([x, *xs])[l], 1.0)
        rows.append({"block": f"W_{l} ({form})", "median_s": t["median_s"], "compile_s": t["compile_s"],
                     "steps": int(info.steps), "budget": c.w_max_steps, "steps_to_tol": to_tol})
    out["blocks"] = {"architecture": "784-300-100-10", "batch": 100, "x_tol": c.x_tol, "w_tol": c.w_tol,
                     "rows": rows}


def _steps_on_rows(x, y):
    """run(trainer, state, idxs): `trainer`'s steps on the rows `idxs` of (x, y) in turn (one fused program per
    step, `loop.step_on_rows`); returns the last state."""
    def run(trainer, state, idxs):
        step = loop.step_on_rows(trainer)
        for idx in idxs:
            state = step(state, x, y, idx)[0]
        return state
    return run


def _equal_layers():
    """The layers and retry sections' network (`EQUAL_DEPTH` hidden layers of `EQUAL_WIDTH`): (its job, its name,
    the first 100 training images and labels)."""
    job = _job(",".join([f"dense:{EQUAL_WIDTH}"] * EQUAL_DEPTH), "adam")
    return job, f"784-{'-'.join([str(EQUAL_WIDTH)] * EQUAL_DEPTH)}-10", job.x_train[:100], job.y_train[:100]


def section_budgets(args, out: dict) -> None:
    """Lifted minibatch steps (784-300-10) at each iteration budget of `--budget-grid` against Adam's step."""
    grid = parse_budget_grid(args.budget_grid)
    lifted, adam = _job(ARCHITECTURES["784-300-10"], "fenchel"), _job(ARCHITECTURES["784-300-10"], "adam")
    x, y = lifted.x_train, lifted.y_train
    batches = loop.epoch_batches(0, 0, x.shape[0], 100)
    warm, n = args.budget_warm_steps, args.budget_steps
    if warm + n > len(batches):
        raise ValueError(f"--budget-warm-steps + --budget-steps = {warm + n} exceeds the {len(batches)} batches of "
                         "an epoch")

    run, timed_idxs = _steps_on_rows(x, y), batches[warm:warm + n]
    # each trainer's own state after `warm` steps
    start = {label: jax.block_until_ready(run(job.trainer, job.trainer.init(job.params0), batches[:warm]))
             for label, job in (("lifted", lifted), ("adam", adam))}
    jobs = {"adam": (adam.trainer, start["adam"], timed_idxs)}
    for xs, ws in grid:
        tr = LiftedTrainer(dataclasses.replace(lifted.trainer.config, x_max_steps=xs, w_max_steps=ws),
                           lifted.trainer.layers)
        jobs[f"{xs}/{ws}"] = (tr, start["lifted"], timed_idxs)
    times = timed_alternating({label: (run, job) for label, job in jobs.items()}, reps=args.reps)
    step_s = {label: t["median_s"] / n for label, t in times.items()}
    adam_s = step_s["adam"]
    rows = [{"x_max_steps": xs, "w_max_steps": ws, "step_s": step_s[f"{xs}/{ws}"],
             "over_adam": step_s[f"{xs}/{ws}"] / adam_s} for xs, ws in grid]
    fit = linear_cost_fit(grid, [r["step_s"] for r in rows])
    out["budgets"] = {"architecture": "784-300-10", "batch": 100, "warm_steps": warm, "steps": n,
                      "adam_step_s": adam_s, "rows": rows, "fit": fit, "fixed_over_adam": fit["fixed_s"] / adam_s}
    print(f"  Adam step {adam_s * 1e3:.2f} ms; lifted step ≈ {fit['fixed_s'] * 1e3:.2f} ms "
          f"({fit['fixed_s'] / adam_s:.2f}x Adam) + {fit['per_x_iteration_s'] * 1e6:.0f} µs per X iteration + "
          f"{fit['per_w_iteration_s'] * 1e6:.0f} µs per W iteration", flush=True)


def _sweep_time(width: int, x, y, reps: int) -> dict:
    layers = mlp((x.shape[1], width, 10))
    params = init_params(jax.random.PRNGKey(0), layers, (x.shape[1],))
    tr = LiftedTrainer(LiftedConfig(), layers)
    return timed(tr.sweep, params, tr.forward(params, x), x, y, reps=reps)


def section_curves(args, out: dict) -> None:
    job = _job("dense:300", "adam")
    x, y = job.x_train, job.y_train
    samples = [n for n in ((1000, 4000, 16000, 60000) if args.quick else (1000, 2000, 5000, 10000, 20000, 60000))
               if n <= x.shape[0]]
    widths = (100, 400, 1600) if args.quick else (100, 300, 1000, 2000, 4000)
    reps = max(2, args.reps // 2)
    by_n = [_sweep_time(300, x[:n], y[:n], reps)["median_s"] for n in samples]
    n_w = min(args.width_samples, x.shape[0])
    by_w = [_sweep_time(w, x[:n_w], y[:n_w], reps)["median_s"] for w in widths]
    big = [i for i, n in enumerate(samples) if n >= 5000]
    out["curves"] = {
        "samples": {"sizes": samples, "seconds": by_n, "exponent": growth_exponent(samples, by_n),
                    "exponent_from_5000": growth_exponent([samples[i] for i in big], [by_n[i] for i in big])
                    if len(big) >= 2 else None, "width": 300},
        "width": {"sizes": list(widths), "seconds": by_w, "exponent": growth_exponent(widths, by_w),
                  "samples": n_w}}
    for key in ("samples", "width"):
        curve = out["curves"][key]
        print(f"  sweep time against {key}: " + ", ".join(f"{s}: {t:.3f} s" for s, t in
                                                          zip(curve["sizes"], curve["seconds"]))
              + f"; exponent {curve['exponent']:.2f}", flush=True)


def section_fullbatch(args, out: dict) -> None:
    """Full-batch BCD with each of `FULLBATCH_VARIANTS`: sweep time (alternating) and F after every sweep."""
    job = _job("dense:300", "adam")
    n = min(args.fullbatch_samples, job.x_train.shape[0])
    x, y = job.x_train[:n], job.y_train[:n]
    layers = mlp((x.shape[1], 300, 10))
    params = init_params(jax.random.PRNGKey(0), layers, (x.shape[1],))
    trainers = {f"{form}, x_chunk_bytes={chunk}": LiftedTrainer(LiftedConfig(w_mode=form, x_chunk_bytes=chunk), layers)
                for form, chunk in FULLBATCH_VARIANTS}
    xs = next(iter(trainers.values())).forward(params, x)
    times = timed_alternating({label: (tr.sweep, (params, xs, x, y)) for label, tr in trainers.items()},
                              reps=max(2, args.reps // 2))
    rows = []
    for (form, chunk), (label, tr) in zip(FULLBATCH_VARIANTS, trainers.items()):
        history = tr.fit_full_batch(params, x, y, sweeps=args.fullbatch_sweeps)[2]
        rows.append({"w_mode": form, "x_chunk_bytes": chunk, "resolved_x_chunk_bytes": tr.config.x_solver.chunk_bytes,
                     "sweep": times[label], "objective": history})
        print(f"  {label}: sweep {times[label]['median_s']:.3f} s, F after 0, 1, {args.fullbatch_sweeps} sweeps "
              f"{history[0]:.4f}, {history[1]:.4f}, {history[-1]:.4f}", flush=True)
    out["fullbatch"] = {"architecture": "784-300-10", "samples": n, "sweeps": args.fullbatch_sweeps, "rows": rows}


def section_layers(args, out: dict) -> None:
    """Equal-width hidden W blocks (784-300-300-300-300-10, batch 100) through `LiftedTrainer`, with
    `stack_layers` off (a list of solves in one program) and on (one solve vmapped over the stacked layers):
    the W step alone and the whole minibatch update."""
    job, architecture, x, y = _equal_layers()
    params = job.params0
    row = {"architecture": architecture, "blocks": EQUAL_DEPTH - 1}
    for mode in ("off", "on"):
        tr = LiftedTrainer(LiftedConfig(stack_layers=mode), job.layers)
        xs, _ = tr.x_step(params, tr.forward(params, x), x, y)
        row[f"w_step_{mode}_s"] = timed(lambda p, z: tr.w_step(p, z, x, y, p, True), params, xs,
                                        reps=args.reps)["median_s"]
        row[f"update_{mode}_s"] = timed(tr.minibatch_update, params, x, y, reps=args.reps)["median_s"]
    row["w_step_on_over_off"] = row["w_step_on_s"] / row["w_step_off_s"]
    row["update_on_over_off"] = row["update_on_s"] / row["update_off_s"]
    out["layers"] = row
    print(f"  W step: list {row['w_step_off_s'] * 1e3:.2f} ms, stacked {row['w_step_on_s'] * 1e3:.2f} ms; "
          f"update: {row['update_off_s'] * 1e3:.2f} / {row['update_on_s'] * 1e3:.2f} ms", flush=True)


def section_retry(args, out: dict) -> None:
    """What the W blocks' non-finite retry (`LiftedConfig.w_retry`, one `lax.cond` per W solve and round) costs:
    the 784-300-10 minibatch step at 10 / 3 and 3 / 2 iterations with it and without, alternating with Adam's
    step (`--budget-steps` steps per call, from the initial weights), and the layers section's W step and update,
    listed and stacked."""
    lifted, adam = _job(ARCHITECTURES["784-300-10"], "fenchel"), _job(ARCHITECTURES["784-300-10"], "adam")
    x, y = lifted.x_train, lifted.y_train
    idxs = loop.epoch_batches(0, 0, x.shape[0], 100)[:args.budget_steps]
    n, run = len(idxs), _steps_on_rows(x, y)
    calls = {"adam": (run, (adam.trainer, adam.trainer.init(adam.params0), idxs))}
    for xs, ws in ((10, 3), (3, 2)):
        for retry in (True, False):
            cfg = dataclasses.replace(lifted.trainer.config, x_max_steps=xs, w_max_steps=ws, w_retry=retry)
            tr = LiftedTrainer(cfg, lifted.trainer.layers)
            calls[f"{xs}/{ws} {retry}"] = (run, (tr, tr.init(lifted.params0), idxs))
    step_s = {label: t["median_s"] / n for label, t in timed_alternating(calls, args.reps).items()}
    rows = [{"x_max_steps": xs, "w_max_steps": ws, "step_retry_s": step_s[f"{xs}/{ws} True"],
             "step_no_retry_s": step_s[f"{xs}/{ws} False"]} for xs, ws in ((10, 3), (3, 2))]

    job, architecture, xb, yb = _equal_layers()
    params, calls_per_rep = job.params0, 20
    calls = {}
    for mode in ("off", "on"):
        for retry in (True, False):
            tr = LiftedTrainer(LiftedConfig(stack_layers=mode, w_retry=retry), job.layers)
            xs_, _ = tr.x_step(params, tr.forward(params, xb), xb, yb)

            def w_steps(p, z, tr=tr):
                for _ in range(calls_per_rep):
                    out = tr.w_step(p, z, xb, yb, p, True)
                return out

            def updates(p, tr=tr):
                for _ in range(calls_per_rep):
                    p = tr.minibatch_update(p, xb, yb)[0]
                return p

            calls[f"w {mode} {retry}"] = (w_steps, (params, xs_))
            calls[f"update {mode} {retry}"] = (updates, (params,))
    layer_s = {label: t["median_s"] / calls_per_rep for label, t in timed_alternating(calls, args.reps).items()}
    layers = [{"stack_layers": mode, "w_step_retry_s": layer_s[f"w {mode} True"],
               "w_step_no_retry_s": layer_s[f"w {mode} False"], "update_retry_s": layer_s[f"update {mode} True"],
               "update_no_retry_s": layer_s[f"update {mode} False"]} for mode in ("off", "on")]
    out["retry"] = {"architecture": "784-300-10", "batch": 100, "steps_per_call": n, "adam_step_s": step_s["adam"],
                    "steps": rows, "layers": layers, "layers_architecture": architecture,
                    "layers_calls_per_rep": calls_per_rep}
    said = [f"{r['x_max_steps']}/{r['w_max_steps']} step {r['step_retry_s'] * 1e3:.2f} ms with the retry, "
            f"{r['step_no_retry_s'] * 1e3:.2f} without" for r in rows]
    print(f"  {'; '.join(said)} (Adam {step_s['adam'] * 1e3:.2f} ms)", flush=True)


def _sharded_step_and_sweep(job, dp, args) -> dict:
    """The lifted minibatch step (batch 800) and full-batch sweep of `job` run sharded by `dp` (primal_mm, the
    configuration a sharded run uses), and the bytes of the step's state on the first device."""
    x, y = job.x_train, job.y_train
    sharded = dp.wrap(LiftedTrainer(LiftedConfig(w_mode="primal_mm"), job.layers))
    state = sharded.init(job.params0)
    device = jax.devices()[0]
    state_bytes = sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(state)
                      for shard in leaf.addressable_shards if shard.device == device)
    batch = 8 * 100
    step = timed(sharded.step, state, dp.shard(x[:batch]), dp.shard(y[:batch]), reps=args.reps)
    x0, y0 = dp.shard(x), dp.shard(y)
    params = dp.place_state(job.params0, len(job.layers))
    lifted = sharded.trainer  # X blocks unchunked on a mesh (`DataParallel.lifted_config`)
    sweep = timed(lifted.sweep, params, lifted.forward(params, x0), x0, y0, reps=max(2, args.reps // 2))
    return {"batch": batch, "step": step, "sweep_samples": int(x.shape[0]), "sweep": sweep,
            "state_bytes_per_device": int(state_bytes)}


def child_devices(n_devices: int, args) -> dict:
    """In a process started with n forced host devices: the sharded step and sweep (784-300-10)."""
    from fenchel.sharding import DataParallel, data_mesh

    job = _job("dense:300", "adam", train_size=args.device_samples)
    return {"devices": n_devices, **_sharded_step_and_sweep(job, DataParallel(data_mesh(n_devices)), args)}


def child_model(mesh: str, args) -> dict:
    """In a process started with data × model forced host devices: the lifted step and sweep of 784-W-10 with
    its hidden neurons split over the model axis, and the state's bytes on the first device."""
    from fenchel.sharding import DataParallel, device_mesh

    job = _job(f"dense:{args.model_width}", "adam", train_size=args.device_samples)
    dp = DataParallel(device_mesh(*parse_mesh(mesh)))
    return {"mesh": mesh, "width": args.model_width, **_sharded_step_and_sweep(job, dp, args)}


def parse_mesh(text: str) -> tuple:
    """"DxM" → (D, M)."""
    try:
        data, model = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad mesh {text!r}: expected DATAxMODEL, e.g. 2x4") from None
    if data < 1 or model < 1:
        raise ValueError(f"bad mesh {text!r}: both sizes must be ≥ 1")
    return data, model


def _child(flag: str, value: str, n_devices: int, args) -> dict:
    """`experiments.bench --FLAG VALUE` in a subprocess with n forced host devices; its JSON line."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.bench", flag, value, "--reps", str(args.reps),
           "--device-samples", str(args.device_samples), "--model-width", str(args.model_width)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the {flag} {value} benchmark failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_model(args, out: dict) -> None:
    rows = []
    for mesh in args.meshes:
        data, model = parse_mesh(mesh)
        rows.append(_child("--child-model", mesh, data * model, args))
        print(f"  mesh {mesh}: step {rows[-1]['step']['median_s'] * 1e3:.1f} ms, sweep "
              f"{rows[-1]['sweep']['median_s']:.3f} s, state {rows[-1]['state_bytes_per_device'] / 2**20:.2f} MiB "
              "per device", flush=True)
    for r in rows:
        for key in ("step", "sweep"):
            r[f"{key}_over_one_device"] = r[key]["median_s"] / rows[0][key]["median_s"]
    out["model"] = rows


def section_devices(args, out: dict) -> None:
    rows = []
    for n in args.devices:
        rows.append(_child("--child-devices", str(n), n, args))
        print(f"  {n} host devices: step {rows[-1]['step']['median_s'] * 1e3:.1f} ms, "
              f"sweep {rows[-1]['sweep']['median_s']:.3f} s", flush=True)
    one = rows[0]
    for row in rows:
        row["step_over_one_device"] = row["step"]["median_s"] / one["step"]["median_s"]
        row["sweep_over_one_device"] = row["sweep"]["median_s"] / one["sweep"]["median_s"]
    out["devices"] = rows


def section_memory(args, out: dict) -> None:
    del args
    mem = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        mem["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    out["memory"] = mem


def machine() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": dev.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python -m experiments.bench", *sys.argv[1:]])}


def section_activations(args, out: dict) -> None:
    """Whole lifted and Adam epochs per activation; the epochs of all jobs interleave, so machine noise hits all."""
    jobs = {(trainer, act): _job(ARCHITECTURES["784-300-10"], trainer, args.activation_samples, activation=act,
                                 **(lifted_iterations(args) if trainer == "fenchel" else {}))
            for act in ACTIVATIONS for trainer in ("fenchel", "adam")}
    seconds = _epoch_seconds(jobs, args.epoch_reps)
    median = {key: statistics.median(v) for key, v in seconds.items()}
    relu = median[("fenchel", "relu")]
    rows = [{"activation": act, "lifted_epoch_s": median[("fenchel", act)], "adam_epoch_s": median[("adam", act)],
             "lifted_over_relu_lifted": median[("fenchel", act)] / relu,
             "lifted_over_adam": median[("fenchel", act)] / median[("adam", act)]} for act in ACTIVATIONS]
    out["activations"] = {"samples": args.activation_samples, "epochs": args.epoch_reps, "rows": rows}
    for r in rows:
        print(f"  {r['activation']}: lifted epoch {r['lifted_epoch_s']:.2f} s = {r['lifted_over_relu_lifted']:.2f}x "
              f"ReLU's", flush=True)


def print_tables(out: dict) -> None:
    m = out["machine"]
    print(f"\n## {m['device']} ({m['platform']}, {m['cpu_count']} CPU cores), jax {m['jax']}, {m['date']}")
    if "epoch" in out:
        print("\n| network | Adam epoch s | lifted epoch s | lifted / Adam | full-batch sweep s (samples) "
              "| sweep / Adam epoch | lifted step ms (compile s) | Adam step ms (compile s) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in out["epoch"].items():
            key = "epoch_s" if "lifted_epoch_s" in r else "epoch_from_steps_s"
            star = "" if key == "epoch_s" else "*"
            print(f"| {name} | {r['adam_' + key]:.2f}{star} | {r['lifted_' + key]:.2f}{star} | "
                  f"{r['lifted_over_adam_epoch']:.2f} | {r['sweep']['median_s']:.3f} ({r['sweep_samples']}) | "
                  f"{r['sweep_over_adam_epoch']:.2f} | {r['lifted_step']['median_s'] * 1e3:.1f} "
                  f"({r['lifted_step']['compile_s']:.1f}) | {r['adam_step']['median_s'] * 1e3:.2f} "
                  f"({r['adam_step']['compile_s']:.1f}) |")
        print("(* median step × steps per epoch)")
        if "matmul_peak" in out:
            peak = out["matmul_peak"]
            for name, r in out["epoch"].items():
                if "sweep_achieved_flops" in r:
                    print(f"{name}: sweep ≈ {r['sweep_achieved_flops'] / 1e12:.2f} TFLOP/s (GEMM estimate) against "
                          f"a measured float32 matmul peak of {peak['float32_default_flops'] / 1e12:.1f} TFLOP/s "
                          f"(default precision), {peak['float32_highest_flops'] / 1e12:.1f} (highest)")
    if "activations" in out:
        a = out["activations"]
        print(f"\n| activation (784-300-10, {a['samples']} images) | lifted epoch s | / ReLU lifted epoch | "
              "Adam epoch s | lifted / Adam |")
        print("|---|---|---|---|---|")
        for r in a["rows"]:
            print(f"| {r['activation']} | {r['lifted_epoch_s']:.2f} | {r['lifted_over_relu_lifted']:.2f} | "
                  f"{r['adam_epoch_s']:.2f} | {r['lifted_over_adam']:.2f} |")
    if "blocks" in out:
        print("\n| block (784-300-100-10, batch 100) | median ms | iterations (budget) | iterations to tolerance |")
        print("|---|---|---|---|")
        for r in out["blocks"]["rows"]:
            print(f"| {r['block']} | {r['median_s'] * 1e3:.2f} | {r['steps']} ({r['budget']}) | {r['steps_to_tol']} |")
    if "budgets" in out:
        b = out["budgets"]
        print(f"\n| iterations per X / W block ({b['architecture']}, batch {b['batch']}, after {b['warm_steps']} "
              f"steps) | lifted step ms | / Adam step ({b['adam_step_s'] * 1e3:.2f} ms) |")
        print("|---|---|---|")
        for r in b["rows"]:
            print(f"| {r['x_max_steps']} / {r['w_max_steps']} | {r['step_s'] * 1e3:.2f} | {r['over_adam']:.2f} |")
        f = b["fit"]
        print(f"(fit: {f['fixed_s'] * 1e3:.2f} ms fixed = {b['fixed_over_adam']:.2f}x Adam's step, "
              f"+ {f['per_x_iteration_s'] * 1e6:.0f} µs per X iteration, + {f['per_w_iteration_s'] * 1e6:.0f} µs "
              "per W iteration)")
    if "layers" in out:
        r = out["layers"]
        print(f"\n{r['architecture']}, batch 100, {r['blocks']} equal hidden W blocks (stack_layers off / on): "
              f"W step {r['w_step_off_s'] * 1e3:.2f} / {r['w_step_on_s'] * 1e3:.2f} ms "
              f"({r['w_step_on_over_off']:.2f}x), minibatch update {r['update_off_s'] * 1e3:.2f} / "
              f"{r['update_on_s'] * 1e3:.2f} ms ({r['update_on_over_off']:.2f}x)")
    if "retry" in out:
        r = out["retry"]
        print("\n| W retry (`w_retry` True / False), batch 100 | ms, with | without | "
              f"/ Adam step ({r['adam_step_s'] * 1e3:.2f} ms), with | without |")
        print("|---|---|---|---|---|")
        for row in r["steps"]:
            print(f"| 784-300-10, {row['x_max_steps']} / {row['w_max_steps']} | {row['step_retry_s'] * 1e3:.3f} | "
                  f"{row['step_no_retry_s'] * 1e3:.3f} | {row['step_retry_s'] / r['adam_step_s']:.2f} | "
                  f"{row['step_no_retry_s'] / r['adam_step_s']:.2f} |")
        for row in r["layers"]:
            for what, key in (("W step", "w_step"), ("update", "update")):
                print(f"| {r['layers_architecture']} {what}, stack_layers={row['stack_layers']} | "
                      f"{row[key + '_retry_s'] * 1e3:.3f} | {row[key + '_no_retry_s'] * 1e3:.3f} | | |")
    if "curves" in out:
        for key, label in (("samples", "samples (784-300-10)"), ("width", "hidden width (784-W-10)")):
            c = out["curves"][key]
            print(f"\n| {label} | " + " | ".join(str(s) for s in c["sizes"]) + " | exponent |")
            print("|---|" + "---|" * (len(c["sizes"]) + 1))
            print("| sweep s | " + " | ".join(f"{t:.3f}" for t in c["seconds"]) + f" | {c['exponent']:.2f} |")
        if out["curves"]["samples"].get("exponent_from_5000") is not None:
            print(f"(samples ≥ 5000: exponent {out['curves']['samples']['exponent_from_5000']:.2f}; width curve on "
                  f"{out['curves']['width']['samples']} samples)")
    if "fullbatch" in out:
        f = out["fullbatch"]
        marks = sorted({1, 3, f["sweeps"]} & set(range(1, f["sweeps"] + 1)))
        print(f"\n| {f['architecture']}, {f['samples']} samples: W form (N > n_in), x_chunk_bytes | sweep s | "
              + " | ".join(f"F after {k}" for k in marks) + " |")
        print("|---|---|" + "---|" * len(marks))
        for r in f["rows"]:
            print(f"| {r['w_mode']}, {r['x_chunk_bytes']} ({r['resolved_x_chunk_bytes']}) | "
                  f"{r['sweep']['median_s']:.3f} | " + " | ".join(f"{r['objective'][k]:.4f}" for k in marks) + " |")
        print(f"(F before the first sweep: {f['rows'][0]['objective'][0]:.4f})")
    if "devices" in out:
        print("\n| forced host devices | sharded step ms (batch 800) | / 1 device | full-batch sweep s | / 1 device |")
        print("|---|---|---|---|---|")
        for r in out["devices"]:
            print(f"| {r['devices']} | {r['step']['median_s'] * 1e3:.1f} | {r['step_over_one_device']:.2f} | "
                  f"{r['sweep']['median_s']:.3f} | {r['sweep_over_one_device']:.2f} |")
    if "model" in out:
        r0 = out["model"][0]
        print(f"\n| 784-{r0['width']}-10, data × model forced host devices | sharded step ms (batch {r0['batch']}) | "
              f"/ {r0['mesh']} | full-batch sweep s ({r0['sweep_samples']}) | / {r0['mesh']} | state MiB per device |")
        print("|---|---|---|---|---|---|")
        for r in out["model"]:
            print(f"| {r['mesh']} | {r['step']['median_s'] * 1e3:.1f} | {r['step_over_one_device']:.2f} | "
                  f"{r['sweep']['median_s']:.3f} | {r['sweep_over_one_device']:.2f} | "
                  f"{r['state_bytes_per_device'] / 2**20:.2f} |")
    if "memory" in out:
        print("\n" + ", ".join(f"{k}: {v:.0f}" for k, v in out["memory"].items()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here (JSON)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions; step-based epochs")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {SECTIONS} (default: all but {', '.join(sorted(NOT_DEFAULT))})")
    p.add_argument("--reps", type=int, default=None, help="timed calls per figure (default 5, quick 3)")
    p.add_argument("--epoch-reps", type=int, default=3, help="whole epochs per MLP trainer")
    p.add_argument("--sweep-samples", type=int, default=60000, help="full-batch sweep size, MLPs")
    p.add_argument("--activation-samples", type=int, default=20000, help="training images of the activations section")
    p.add_argument("--lenet-sweep-samples", type=int, default=None,
                   help="full-batch sweep size, LeNet-5 (default 60000 on a GPU, 5000 on a CPU)")
    p.add_argument("--width-samples", type=int, default=None, help="samples of the width curve (GPU 60000, CPU 10000)")
    p.add_argument("--fullbatch-samples", type=int, default=None,
                   help="images of the fullbatch section (default 60000 on a GPU, 10000 on a CPU)")
    p.add_argument("--fullbatch-sweeps", type=int, default=10, help="sweeps of the fullbatch section's fits")
    p.add_argument("--devices", default="1,2,4,8", help="forced host device counts of the devices section")
    p.add_argument("--device-samples", type=int, default=8000, help="full-batch size of the devices section")
    p.add_argument("--meshes", default="1x1,8x1,4x2,2x4,1x8",
                   help="DATAxMODEL forced host device meshes of the model section (the first is the reference)")
    p.add_argument("--model-width", type=int, default=2048, help="hidden width of the model section's 784-W-10")
    p.add_argument("--x-steps", type=int, default=None, help="lifted x_max_steps (default: the config's)")
    p.add_argument("--w-steps", type=int, default=None, help="lifted w_max_steps (default: the config's)")
    p.add_argument("--budget-grid", default="1/1,1/3,3/1,3/2,10/1,10/3",
                   help="X/W iteration budgets of the budgets section, comma-separated")
    p.add_argument("--budget-warm-steps", type=int, default=300, help="training steps before the budgets are timed")
    p.add_argument("--budget-steps", type=int, default=100, help="timed steps per budget and repetition")
    p.add_argument("--child-devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.child_devices:
        print(json.dumps(child_devices(args.child_devices, args)))
        return
    if args.child_model:
        print(json.dumps(child_model(args.child_model, args)))
        return
    gpu = jax.devices()[0].platform == "gpu"
    args.lenet_sweep_samples = args.lenet_sweep_samples or (60000 if gpu else 5000)
    args.width_samples = args.width_samples or (60000 if gpu else 10000)
    args.fullbatch_samples = args.fullbatch_samples or (60000 if gpu else 10000)
    args.devices = [int(n) for n in args.devices.split(",") if n]
    args.meshes = [m for m in args.meshes.split(",") if m]
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    if "model" in sections:
        try:
            for mesh in args.meshes:
                parse_mesh(mesh)
        except ValueError as err:
            p.error(str(err))
        if args.model_width < 1:
            p.error("--model-width must be ≥ 1")
    if "retry" in sections and not 1 <= args.budget_steps <= 600:
        p.error("--budget-steps must be between 1 and 600 (the batches of an MNIST epoch) for the retry section")
    if "budgets" in sections:
        try:
            parse_budget_grid(args.budget_grid)
        except ValueError as err:
            p.error(str(err))
        if args.budget_warm_steps < 0 or args.budget_steps < 1:
            p.error("--budget-warm-steps must be ≥ 0 and --budget-steps ≥ 1")
    out = {"machine": machine(), "lifted_iterations": lifted_iterations(args)}
    for name in SECTIONS:
        if name in sections:
            print(f"[{name}]", flush=True)
            globals()[f"section_{name}"](args, out)
    print_tables(out)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
