"""Benchmark of the lifted LeNet-5 minibatch step on MNIST: time per block, and the conv W-solver forms.

For one real minibatch it prints the median wall time of each X block and each
W block solved alone (jitted, compilation excluded), of the whole minibatch
update, and of one Adam step on the same network; then, for the two conv W
blocks, the objective gap after a few iterations of plain FISTA ("primal")
against FISTA preconditioned by the exact patch-matrix majoriser ("primal_mm").

    python -m experiments.bench_lenet [--batch-size 100] [--reps 10] [--x-steps K --w-steps K]

--x-steps/--w-steps override the config's iterations per X/W block (x_max_steps, w_max_steps).
"""

from __future__ import annotations

import argparse

import jax

from configs import mnist_lenet5
from experiments.bench import lifted_iterations
from experiments.bench_blocks import median_ms
from experiments.train import Job
from fenchel import LiftedTrainer, SolverConfig, blocks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--x-steps", type=int, default=None, help="x_max_steps (default: the config's)")
    p.add_argument("--w-steps", type=int, default=None, help="w_max_steps (default: the config's)")
    args = p.parse_args(argv)
    config = mnist_lenet5.get_config()
    config.update(dict(batch_size=args.batch_size, train_size=args.batch_size * 10, test_size=100, progress=False))
    config.update(lifted_iterations(args))
    job = Job(config)
    tr: LiftedTrainer = job.trainer
    x, y, params = job.x_train[:args.batch_size], job.y_train[:args.batch_size], job.params0
    xs = tr.forward(params, x)
    c = tr.config
    print(f"LeNet-5 {job.architecture}, batch {args.batch_size}, x_max_steps={c.x_max_steps}, "
          f"w_max_steps={c.w_max_steps}, {jax.devices()[0].platform}")
    print("| block | median ms |")
    print("|---|---|")
    total = 0.0
    xs = list(xs)
    for l in range(tr.n_layers - 1, 0, -1):  # in the sequential schedule's order, each on the X it would see
        ms = median_ms(tr.x_block, l, params, xs, x, y, reps=args.reps)
        xs[l - 1], info = tr.x_block(l, params, xs, x, y)
        total += ms
        print(f"| X_{l} ({tuple(xs[l - 1].shape[1:])}), {int(info.steps)} iterations | {ms:.1f} |", flush=True)
    for l in range(tr.n_layers):  # on the X after the X step, anchored at the start, as in a minibatch update
        ms = median_ms(lambda p, z, l=l: tr.w_block(l, p, z, x, y, p, anchor_is_start=True), params, xs,
                       reps=args.reps)
        steps = int(tr.w_block(l, params, xs, x, y, params, anchor_is_start=True)[1].steps)
        total += ms
        form = tr.layers[l].w_form(c.w_mode, ([x, *xs])[l], 1.0)
        print(f"| W_{l} ({job.layers[l].kind}, {form}), {steps} iterations | {ms:.1f} |", flush=True)
    step = median_ms(tr.minibatch_update, params, x, y, reps=args.reps)
    print(f"| sum of blocks | {total:.1f} |\n| whole minibatch update | {step:.1f} |")
    adam = Job(_adam(config))
    state = adam.trainer.init(params)
    print(f"| one Adam step | {median_ms(adam.trainer.step, state, x, y, reps=args.reps):.1f} |", flush=True)

    print("\n| conv W block | form | iterations | median ms | objective gap |")
    print("|---|---|---|---|---|")
    pen = tr.penalty
    for l in (0, 1):
        x_in = ([x, *xs])[l]
        best = None
        rows = []
        for form in ("primal_mm", "primal"):
            for steps in ((3, 10, 3000) if form == "primal_mm" else (3, 10, 30)):
                sc = SolverConfig(tol=1e-12, max_steps=steps)
                fn = jax.jit(lambda layer, x_in, x_out, sc=sc, form=form, l=l: blocks.solve_w_hidden(
                    pen, tr.layers[l], layer, x_in, x_out, tr.lambdas[l], tr.rhos[l], sc, layer, tr.rho_proxes[l],
                    w_mode=form, anchor_is_start=True))
                value = float(fn(params[l], x_in, xs[l])[1].value)
                if steps == 3000:
                    best = value
                    continue
                rows.append((form, steps, median_ms(fn, params[l], x_in, xs[l], reps=args.reps), value))
        for form, steps, ms, value in rows:
            print(f"| W_{l} | {form} | {steps} | {ms:.1f} | {value - best:.2e} |", flush=True)


def _adam(config):
    c = config.copy_and_resolve_references()
    c.trainer = "adam"
    return c


if __name__ == "__main__":
    main()
