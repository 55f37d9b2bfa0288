"""Benchmark of block-solver choices on a real MNIST minibatch (784-300-10, batch 100).

For the first-layer W block (the dominant cost) it prints, per solver form
and iteration budget, the median wall time of one solve and the gap of its
objective to the optimum; then batched against vmapped X solves.

    python -m experiments.bench_blocks
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from configs import default as default_config
from fenchel import LiftedConfig, LiftedTrainer, SolverConfig, blocks, init_params, mlp
from fenchel.data import load_dataset
from fenchel.lifted import loss_per_sample


def median_ms(fn, *args, reps=30):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    d = default_config.get_config()
    data = load_dataset("mnist", train_size=args.batch_size)
    x = jnp.asarray(data.x_train)
    y = jax.nn.one_hot(jnp.asarray(data.y_train), 10)
    layers = mlp((784, 300, 10))
    params = init_params(jax.random.PRNGKey(0), layers, (784,))
    cfg = LiftedConfig(lambdas=d.lambda_, rho=d.rho, rho_prox=d.rho_prox, x_tol=1e-6, x_max_steps=d.x_max_steps)
    trainer = LiftedTrainer(cfg, layers)
    xs, _ = trainer.x_step(params, trainer.forward(params, x), x, y)  # targets of the W step
    pen = cfg.penalty

    def solver(mode, steps):
        sc = SolverConfig(tol=1e-12, max_steps=steps)
        return jax.jit(lambda layer, x_in, x_out: blocks.solve_w_hidden(
            pen, layers[0], layer, x_in, x_out, d.lambda_, d.rho, sc, layer, d.rho_prox, w_mode=mode,
            anchor_is_start=True))

    best = float(solver("kernel_mm", 2000)(params[0], x, xs[0])[1].value)
    print(f"first-layer W block (784x300, N={args.batch_size}, lambda={d.lambda_}, rho'={d.rho_prox}); "
          f"optimum {best:.8f}")
    print("| form | iterations | median ms | objective gap |")
    print("|---|---|---|---|")
    for mode in ("primal", "kernel", "kernel_mm"):
        for steps in (1, 3, 10, 30, 100):
            fn = solver(mode, steps)
            value = float(fn(params[0], x, xs[0])[1].value)
            print(f"| {mode} | {steps} | {median_ms(fn, params[0], x, xs[0], reps=args.reps):.2f} | "
                  f"{value - best:.2e} |", flush=True)

    # output block: softmax regression 300→10 with the proximal term; MM-FISTA against optax.lbfgs
    x_in, layer = xs[0], params[1]
    rho, rho_prox = d.rho, d.rho_prox

    def out_objective(p):
        fit = jnp.mean(loss_per_sample("softmax", y, x_in @ p["kernel"] + p["bias"]))
        prox = sum(jnp.sum((p[k] - layer[k]) ** 2) for k in ("kernel", "bias"))
        return fit + rho * jnp.sum(p["kernel"] ** 2) + rho_prox * prox

    def mm(steps):
        sc = SolverConfig(tol=1e-12, max_steps=steps)
        return jax.jit(lambda p: blocks.solve_w_out(layers[1], p, x_in, y, rho, "softmax", sc, p, rho_prox,
                                                    anchor_is_start=True)[0])

    def lbfgs(steps):
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(out_objective)

        def body(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=out_objective)
            return (optax.apply_updates(p, updates), state), None

        return jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, length=steps)[0][0])

    best_out = min(float(out_objective(mm(3000)(layer))), float(out_objective(lbfgs(500)(layer))))
    print()
    print(f"output W block (300x10 softmax regression, N={args.batch_size}); optimum {best_out:.8f}")
    print("| solver | iterations | median ms | objective gap |")
    print("|---|---|---|---|")
    for name, make in (("kernel_mm FISTA", mm), ("optax.lbfgs", lbfgs)):
        for steps in (1, 3, 10, 30):
            fn = make(steps)
            gap = float(out_objective(fn(layer))) - best_out
            print(f"| {name} | {steps} | {median_ms(fn, layer, reps=args.reps):.2f} | {gap:.2e} |", flush=True)

    print()
    print("| X solve (last hidden layer, 10 iterations) | median ms |")
    print("|---|---|")
    for x_mode in ("batched", "vmap"):
        t = LiftedTrainer(LiftedConfig(lambdas=d.lambda_, x_mode=x_mode, x_tol=1e-12, x_max_steps=d.x_max_steps),
                          layers)
        xs0 = t.forward(params, x)
        print(f"| {x_mode} | {median_ms(t.x_step, params, xs0, x, y, reps=args.reps):.2f} |", flush=True)


if __name__ == "__main__":
    main()
