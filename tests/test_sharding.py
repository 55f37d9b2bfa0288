"""Data- and model-parallel training on 8 forced CPU devices (tests/conftest.py) equals one-device training.

The expected values are the one-device runs of the same code: sharding must change nothing but the order
of floating-point sums (float64 here, so agreement is to ~1e-10). The compiled programs are read to check
that the W forms chosen for sharding reduce over samples instead of gathering the samples.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fenchel import SCHEDULES, GradientTrainer, LiftedConfig, LiftedTrainer, blocks, init_params, make_optimizer
from fenchel.layers import Conv, Dense, parse_layers
from fenchel.penalties import activation_penalty
from fenchel.sharding import DataParallel, ShardedTrainer, data_mesh, device_mesh
from fenchel.trainer import StepInfo, Trainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")


def _data(n, in_shape, classes, seed=0):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.uniform(kx, (n, *in_shape), jnp.float64)
    y = jax.nn.one_hot(jax.random.randint(ky, (n,), 0, classes), classes, dtype=jnp.float64)
    return x, y


def _close(a_tree, b_tree, tol=1e-9):
    for a, b in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _collectives(compiled_text):
    """(kind, result shape) of every cross-device collective in an HLO module's text."""
    pattern = r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
    return [(kind, shape) for shape, kind in re.findall(pattern, compiled_text)]


def _three_steps(single, sharded, params, x, y):
    """Three minibatch steps of 16 rows of (x, y) by both trainers from `params`; their states."""
    s1, s8 = single.init(params), sharded.init(params)
    for k in range(3):
        idx = slice(16 * k, 16 * k + 16)
        s1, _ = single.step(s1, x[idx], y[idx])
        s8, info = sharded.step(s8, x[idx], y[idx])
        assert not bool(info.nonfinite)
    return s1, s8


MLP = (Dense(7), Dense(6), Dense(5), Dense(3))  # three hidden layers: both parities in the parallel schedule
CNN = (*parse_layers("conv:3:3:same,pool:2,dense:6"), Dense(3))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_sharded_minibatch_training_equals_one_device(schedule, net):
    layers, in_shape = (MLP, (5,)) if net == "mlp" else (CNN, (6, 6, 2))
    x, y = _data(64, in_shape, 3)
    params = init_params(jax.random.PRNGKey(1), layers, in_shape, jnp.float64)
    config = LiftedConfig(schedule=schedule, alternations=2, w_mode="primal_mm")
    single = LiftedTrainer(config, layers)
    sharded = DataParallel(data_mesh(8)).wrap(LiftedTrainer(config, layers))
    s1, s8 = _three_steps(single, sharded, params, x, y)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(params)))
    assert moved > 1e-3  # training did something
    _close(sharded.params(s8), single.params(s1))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(s8))
    _close(sharded.metrics(s8, x[:48], y[:48]), single.metrics(s1, x[:48], y[:48]))


def test_sharded_metrics_use_every_row_when_the_rows_do_not_split_over_the_devices():
    """50 rows on 8 devices: the metrics are the one-device figures on all 50 rows, not on the 48 that split
    evenly (dropping them changed the logged objective silently)."""
    x, y = _data(50, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), MLP, (5,), jnp.float64)
    config = LiftedConfig(w_mode="primal_mm", bound_max_sweeps=3)
    single = LiftedTrainer(config, MLP)
    sharded = DataParallel(data_mesh(8)).wrap(LiftedTrainer(config, MLP))
    s1, s8 = single.step(single.init(params), x[:16], y[:16])[0], sharded.step(sharded.init(params), x[:16], y[:16])[0]
    all_rows, first_48 = single.metrics(s1, x, y), single.metrics(s1, x[:48], y[:48])
    assert abs(all_rows["lifted_objective"] - first_48["lifted_objective"]) > 1e-6  # the two rows matter
    got = sharded.metrics(s8, x, y)
    assert got.keys() == all_rows.keys()
    _close(got, all_rows)


def test_sharded_lifted_trainer_keeps_its_guided_head():
    """wrap() rebuilds an auto-form LiftedTrainer for the mesh; a GuideBP head (state: weakness scores) must
    survive, and the sharded guided steps equal the one-device ones."""
    from fenchel.heads import Head

    x, y = _data(32, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), MLP, (5,), jnp.float64)
    head = Head(3, "guide")
    single = LiftedTrainer(LiftedConfig(w_mode="primal_mm"), MLP, head)
    sharded = DataParallel(data_mesh(8)).wrap(LiftedTrainer(LiftedConfig(), MLP, head))
    assert sharded.trainer.head is head and sharded.trainer.config.w_mode == "primal_mm"
    s1, s8 = single.init(params), sharded.init(params)
    for _ in range(2):
        s1, _ = single.step(s1, x, y)
        s8, _ = sharded.step(s8, x, y)
    _close(s8, s1)
    _close(sharded.params(s8), single.params(s1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_sharded_full_batch_bcd_equals_one_device(schedule):
    x, y = _data(80, (5,), 3, seed=2)
    params = init_params(jax.random.PRNGKey(3), MLP, (5,), jnp.float64)
    trainer = LiftedTrainer(LiftedConfig(schedule=schedule, w_mode="primal_mm"), MLP)
    p1, xs1, hist1 = trainer.fit_full_batch(params, x, y, sweeps=3)
    dp = DataParallel(data_mesh(8))
    p8, xs8, hist8 = trainer.fit_full_batch(dp.replicate(params), dp.shard(x), dp.shard(y), sweeps=3)
    assert hist1[-1] < hist1[0]
    np.testing.assert_allclose(hist8, hist1, rtol=1e-10)
    _close(p8, p1)
    _close(xs8, xs1)
    assert xs8[0].sharding.spec[0] == "data"  # the lifted variables stay sharded over samples


def test_sharded_full_batch_bcd_with_x_blocks_in_row_chunks_equals_one_device():
    """X blocks solved in chunks of 16 rows (`x_chunk_bytes`) on samples sharded over 8 devices: the chunks cut
    across the devices' shares and the result is still the one-device, one-piece sweep's. `DataParallel` turns
    the CPU's "auto" chunking off (`lifted_config`), so this is the explicit setting."""
    x, y = _data(80, (5,), 3, seed=2)
    params = init_params(jax.random.PRNGKey(3), MLP, (5,), jnp.float64)
    whole = LiftedTrainer(LiftedConfig(w_mode="primal_mm", x_chunk_bytes=0), MLP)
    chunked = LiftedTrainer(LiftedConfig(w_mode="primal_mm", x_chunk_bytes=16 * 7 * 8), MLP)
    p1, xs1, hist1 = whole.fit_full_batch(params, x, y, sweeps=2)
    dp = DataParallel(data_mesh(8))
    p8, xs8, hist8 = chunked.fit_full_batch(dp.replicate(params), dp.shard(x), dp.shard(y), sweeps=2)
    np.testing.assert_allclose(hist8, hist1, rtol=1e-10)
    _close(p8, p1)
    _close(xs8, xs1)
    resolved = dp.lifted_config(LiftedConfig())
    assert (resolved.x_chunk_bytes, resolved.w_mode) == (0, "primal_mm")
    assert dp.lifted_config(LiftedConfig(x_chunk_bytes=512)).x_chunk_bytes == 512


def test_sharded_w_block_reduction_equals_unsharded():
    """One W block on sharded (X_in, X_out) equals the same block unsharded, for every dense and conv form."""
    penalty = activation_penalty("relu")
    dp = DataParallel(data_mesh(8))
    cases = [(Dense(6), (9,), ("primal", "primal_mm", "kernel", "kernel_mm")),
             (Conv(4, 3, padding="SAME"), (5, 5, 2), ("primal", "primal_mm"))]
    for spec, in_shape, forms in cases:
        x_in, _ = _data(32, in_shape, 3, seed=4)
        layer = init_params(jax.random.PRNGKey(5), (spec,), in_shape, jnp.float64)[0]
        u = spec.linear_map(x_in, layer["kernel"]) + layer["bias"]
        x_out = jnp.maximum(u + 0.3 * jax.random.normal(jax.random.PRNGKey(6), u.shape, jnp.float64), 0.0)
        cfg = blocks.SolverConfig(tol=1e-8, max_steps=50)
        for form in forms:
            def solve(a, b, form=form):
                return blocks.solve_w_hidden(penalty, spec, layer, a, b, 2.0, 1e-3, cfg, layer, 0.1, form, True)[0]
            expected = jax.jit(solve)(x_in, x_out)
            got = jax.jit(solve)(dp.shard(x_in), dp.shard(x_out))
            _close(got, expected)


def test_primal_mm_step_reduces_over_samples_instead_of_gathering_them():
    """The sharded lifted step with w_mode auto (resolved to primal_mm) has no all-gather: every collective's
    result is at most a (n_in + 1)² majoriser or a weight-sized sum, never sample-sized."""
    layers, n = (Dense(30), Dense(3)), 1600
    x, y = _data(n, (20,), 3)
    params = init_params(jax.random.PRNGKey(1), layers, (20,), jnp.float64)
    sharded = DataParallel(data_mesh(8)).wrap(LiftedTrainer(LiftedConfig(), layers))
    assert sharded.trainer.config.w_mode == "primal_mm"
    state = sharded.init(params)
    text = sharded.program(state).lower(state, x, y).compile().as_text()
    colls = _collectives(text)
    assert colls and all(kind == "all-reduce" for kind, _ in colls), colls
    sizes = [int(np.prod([int(d) for d in dims.split(",")])) if dims else 1
             for _, shape in colls for dims in re.findall(r"\[([\d,]*)\]", shape)]
    assert max(sizes) <= 31 * 31 and max(sizes) < n
    # the kernel form's N × N Gram matrix cannot be formed from local samples: it gathers them
    kernel = DataParallel(data_mesh(8)).wrap(LiftedTrainer(LiftedConfig(w_mode="kernel_mm"), layers))
    state = kernel.init(params)
    kinds = {kind for kind, _ in _collectives(kernel.program(state).lower(state, x, y).compile().as_text())}
    assert "all-gather" in kinds


def test_sharded_gradient_trainer_equals_one_device():
    x, y = _data(32, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), MLP, (5,), jnp.float64)
    make = lambda: GradientTrainer(MLP, activation_penalty("relu"), make_optimizer("adam", 1e-2))  # noqa: E731
    single, sharded = make(), ShardedTrainer(make(), DataParallel(data_mesh(8)))
    s1, s8 = single.init(params), sharded.init(params)
    for _ in range(3):
        s1, i1 = single.step(s1, x, y)
        s8, i8 = sharded.step(s8, x, y)
        np.testing.assert_allclose(float(i8.loss), float(i1.loss), rtol=1e-10)
    _close(sharded.params(s8), single.params(s1))


def test_mesh_and_batch_errors_are_clear():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        data_mesh(jax.device_count() + 1)
    dp = DataParallel(data_mesh(8))
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        dp.check_batch_size(12)
    trainer = dp.wrap(LiftedTrainer(LiftedConfig(), MLP))
    x, y = _data(12, (5,), 3)
    with pytest.raises(ValueError, match="not divisible"):
        trainer.step(trainer.init(init_params(jax.random.PRNGKey(0), MLP, (5,), jnp.float64)), x, y)
    with pytest.raises(ValueError, match="needs an axis named 'data'"):
        DataParallel(jax.make_mesh((8,), ("batch",)))


# ---------------------------------------------------------------- the launcher
def _launch(tmp_path, name, *overrides, env_devices=None, processes=1):
    """Run experiments.run on configs/tiny.py in subprocesses (1 or several processes); returns the workdir."""
    workdir = tmp_path / name
    args = [sys.executable, "-m", "experiments.run", "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), "--config.train_size=800", "--config.test_size=400",
            "--config.total_epochs=1", "--config.warm_start_epochs=0", "--config.batch_size=80", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={env_devices or 1}"
    if processes == 1:
        subprocess.run(args, check=True, cwd=ROOT, env=env, capture_output=True, timeout=600)
        return workdir
    port = 23000 + os.getpid() % 2000
    procs = [subprocess.Popen([*args, "--config.distributed=True", f"--config.coordinator_address=localhost:{port}",
                               f"--config.num_processes={processes}", f"--config.process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(processes)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err.decode()[-3000:]
    return workdir


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_launcher_on_8_devices_and_on_2_processes_matches_one_device(tmp_path):
    """configs/tiny.py with --config.mesh_data=8, as 2 processes × 2 devices (jax.distributed on localhost,
    mesh_data=0: all 4 devices), and as 2 processes × 4 devices on a 4 × 2 data × model mesh, gives the one-device
    run's metrics; process 0 alone writes."""
    # w_mode auto means primal_mm on a mesh (fenchel.sharding); the one-device run names it
    one = _metrics(_launch(tmp_path, "one", "--config.w_mode=primal_mm"))
    eight = _metrics(_launch(tmp_path, "eight", "--config.mesh_data=8", env_devices=8))
    multi_dir = _launch(tmp_path, "multi", "--config.mesh_data=0", env_devices=2, processes=2)
    multi = _metrics(multi_dir)
    # 2 processes × 4 devices as a 4 × 2 data × model mesh: the data axis spans the processes, the model axis not;
    # with a parameter history (process 0 alone records it) and a warm start from the model-sharded weights
    model_dir = _launch(tmp_path, "model", "--config.mesh_data=0", "--config.mesh_model=2", "--config.record_every=5",
                        "--config.warm_start_epochs=1", env_devices=4, processes=2)
    model = _metrics(model_dir)
    assert len(list((model_dir / "history").glob("chunk_*.npz"))) >= 1
    assert json.loads((model_dir / "summary.json").read_text())["warm_start_test_accuracy"] > 0.6
    assert len(one) == len(eight) == len(multi) == len(model) == 1
    for other in (eight, multi, model):  # float32 training: equal up to the order of sums
        assert abs(other[0]["test_accuracy"] - one[0]["test_accuracy"]) <= 1 / 400
        np.testing.assert_allclose(other[0]["train_loss"], one[0]["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(other[0]["lifted_objective"], one[0]["lifted_objective"], rtol=1e-5)
    assert one[0]["test_accuracy"] > 0.6
    assert json.loads((multi_dir / "summary.json").read_text())["test_accuracy"] == multi[0]["test_accuracy"]
    assert not list(multi_dir.glob("*.tmp*"))


def test_launcher_mesh_errors_before_compute(tmp_path):
    from configs import tiny
    from experiments.train import validate_config

    c = tiny.get_config()
    c.mesh_data = 8
    c.batch_size = 100
    with pytest.raises(ValueError, match="batch_size=100 is not divisible by mesh_data=8"):
        validate_config(c)
    c = tiny.get_config()
    c.process_id = 1
    with pytest.raises(ValueError, match="need distributed=True"):
        validate_config(c)


def test_data_mesh_spans_the_requested_devices():
    mesh = data_mesh(4)
    assert mesh.shape == {"data": 4} and list(mesh.devices) == jax.devices()[:4]
    assert DataParallel(mesh).batch.spec == P("data")


@pytest.mark.parametrize("mesh_data, size", [(0, 8), (4, 4), (1, None)])
def test_launcher_mesh_data_zero_means_every_device(mesh_data, size):
    """mesh_data=0 shards over all devices (8 here), n over n, and 1 runs unsharded."""
    from configs import tiny
    from experiments.train import Job

    config = tiny.get_config()
    config.update(dict(mesh_data=mesh_data, train_size=200, test_size=40, batch_size=40))
    job = Job(config)
    if size is None:
        assert job.parallel is None and not isinstance(job.trainer, ShardedTrainer)
    else:
        assert job.parallel.size == size and isinstance(job.trainer, ShardedTrainer)
        assert job.trainer.parallel is job.parallel


def test_step_on_rows_runs_the_sharded_program():
    """The epoch loop's gather-and-step goes through the sharded program, with the batch split over samples."""
    x, y = _data(32, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), MLP, (5,), jnp.float64)
    sharded = DataParallel(data_mesh(8)).wrap(
        GradientTrainer(MLP, activation_penalty("relu"), make_optimizer("adam", 1e-2)))
    seen = []
    program = sharded._step

    def spy(state, xb, yb):
        seen.append((xb.sharding, yb.sharding))
        return program(state, xb, yb)

    sharded._step = spy
    state = sharded.init(params)
    idx = jnp.arange(8, 24)
    got = sharded.step_on_rows(state, x, y, idx)[0]
    assert seen == [(sharded.parallel.batch, sharded.parallel.batch)]
    _close(got, sharded.step(state, x[8:24], y[8:24])[0])


def test_data_mesh_takes_the_same_number_of_devices_from_each_process(monkeypatch):
    """Two simulated hosts of 4 devices: all 8 by default, and a mesh of 4 takes the first 2 of each host (a
    mesh of devices[:4] would leave host 1 without a shard of the batch)."""
    import types

    from fenchel import sharding

    devices = [types.SimpleNamespace(id=i, process_index=i // 4, platform="cpu") for i in range(8)]
    meshes = []
    monkeypatch.setattr(jax, "devices", lambda: devices)
    monkeypatch.setattr(jax, "local_devices", lambda: devices[:4])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "make_mesh", lambda shape, names, axis_types=None, devices=None:
                        meshes.append((shape, [d.id for d in devices])))
    sharding.data_mesh(None)
    sharding.data_mesh(4)
    assert meshes == [((8,), list(range(8))), ((4,), [0, 1, 4, 5])]
    with pytest.raises(ValueError, match="same number of devices in each of the 2 processes"):
        sharding.data_mesh(3)


# ---------------------------------------------------------------- the model axis
WIDE = (Dense(8), Dense(12), Dense(8), Dense(3))  # three hidden layers; 12 does not divide by 8


def _model_sharded(leaf) -> bool:
    return leaf.sharding.spec[-1:] == ("model",) if leaf.ndim else False


@pytest.mark.parametrize("data, model, schedule", [(2, 4, "sequential"), (1, 8, "parallel")])
def test_model_axis_training_equals_one_device(data, model, schedule):
    """Hidden layers' neurons split over a model axis (with outer momentum, whose state mirrors the weights): the
    same weights and metrics as one device. With 8 model devices the 12-wide layer stays replicated."""
    x, y = _data(64, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), WIDE, (5,), jnp.float64)
    config = LiftedConfig(schedule=schedule, w_mode="primal_mm", outer_momentum=0.5, bound_max_sweeps=3)
    single = LiftedTrainer(config, WIDE)
    dp = DataParallel(device_mesh(data, model))
    sharded = dp.wrap(LiftedTrainer(config, WIDE))
    s1, s8 = _three_steps(single, sharded, params, x, y)
    weights, momentum = s8[0], s8[1][0].trace
    for tree in (weights, momentum):
        split = [[_model_sharded(tree[l][name]) for name in ("kernel", "bias")] for l in range(4)]
        assert split == [[True, True], [model == 4] * 2, [True, True], [False, False]]
    assert dp.model_size == model and s8[0][0]["kernel"].addressable_shards[0].data.shape == (5, 8 // model)
    _close(s8, s1)
    got = sharded.params(s8)  # host arrays: no device holds the unsharded weights
    assert all(type(leaf) is np.ndarray for leaf in jax.tree_util.tree_leaves(got))
    _close(got, single.params(s1))
    replicated = dp.replicate(s8)  # a state on the mesh with other shardings is placed again, not refused
    _close(sharded.step(replicated, x[:16], y[:16])[0], sharded.step(s8, x[:16], y[:16])[0])
    _close(sharded.metrics(s8, x[:48], y[:48]), single.metrics(s1, x[:48], y[:48]))
    if data > 1:  # 50 rows do not split over the data axis: evaluated on one device from the host copy
        _close(sharded.metrics(s8, x[:50], y[:50]), single.metrics(s1, x[:50], y[:50]))


def test_model_axis_on_conv_channels_and_the_gradient_trainer_equals_one_device():
    """A conv layer's output channels split over the model axis, for lifted training and for Adam (whose two
    moment estimates mirror the weights)."""
    x, y = _data(32, (6, 6, 2), 3)
    layers = (*parse_layers("conv:4:3:same,pool:2,dense:8"), Dense(3))
    params = init_params(jax.random.PRNGKey(1), layers, (6, 6, 2), jnp.float64)
    dp = DataParallel(device_mesh(2, 4))
    for make in (lambda: LiftedTrainer(LiftedConfig(w_mode="primal_mm"), layers),
                 lambda: GradientTrainer(layers, activation_penalty("relu"), make_optimizer("adam", 1e-2))):
        single, sharded = make(), dp.wrap(make())
        s1, s8 = single.init(params), sharded.init(params)
        for _ in range(2):
            s1, _ = single.step(s1, x, y)
            s8, _ = sharded.step(s8, x, y)
        kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(s8)
                   if path[-1] == jax.tree_util.DictKey("kernel")]
        assert [_model_sharded(k) for k in kernels] == [True, True, False] * (len(kernels) // 3)
        assert kernels[0].addressable_shards[0].data.shape == (3, 3, 2, 1)
        _close(s8, s1)


@pytest.mark.parametrize("form", ["kernel_mm", "primal_mm"])
def test_model_axis_step_never_moves_the_wide_layer_between_devices(form):
    """On a 1 × 8 mesh the hidden W block splits over its neurons: no collective of the compiled step has an axis of
    the 300 inputs or half the 300 × 64 hidden kernel's size; what crosses devices is logit-sized (the X-last
    block's partial products) or the output layer's (its input X₁, 96 × 64, and primal_mm's 65 × 65 majoriser)."""
    layers = (Dense(64), Dense(10))
    x, y = _data(96, (300,), 10)
    params = init_params(jax.random.PRNGKey(1), layers, (300,), jnp.float64)
    sharded = DataParallel(device_mesh(1, 8)).wrap(LiftedTrainer(LiftedConfig(w_mode=form), layers))
    state = sharded.init(params)
    colls = _collectives(sharded.program(state).lower(state, x, y).compile().as_text())
    sizes = [int(np.prod([int(d) for d in dims.split(",")])) if dims else 1
             for _, shape in colls for dims in re.findall(r"\[([\d,]*)\]", shape)]
    dims = {int(d) for _, shape in colls for d in re.findall(r"\d+", re.sub(r"f\d+|\{[^}]*\}", "", shape))}
    assert colls and max(sizes) < 300 * 64 // 2 and not dims & {300, 301}, colls


def test_model_axis_full_batch_bcd_equals_one_device():
    x, y = _data(80, (5,), 3, seed=2)
    params = init_params(jax.random.PRNGKey(3), WIDE, (5,), jnp.float64)
    trainer = LiftedTrainer(LiftedConfig(schedule="parallel", w_mode="primal_mm"), WIDE)
    p1, xs1, hist1 = trainer.fit_full_batch(params, x, y, sweeps=3)
    dp = DataParallel(device_mesh(2, 4))
    placed = dp.place_state(params, len(WIDE))
    assert placed[1]["kernel"].sharding.spec == P(None, "model")
    p8, xs8, hist8 = trainer.fit_full_batch(placed, dp.shard(x), dp.shard(y), sweeps=3)
    assert hist1[-1] < hist1[0]
    np.testing.assert_allclose(hist8, hist1, rtol=1e-10)
    _close(p8, p1)
    _close(xs8, xs1)


def test_model_axis_errors_are_clear():
    with pytest.raises(ValueError, match="data · model ≤ 8"):
        device_mesh(4, 4)
    with pytest.raises(ValueError, match="at least 1"):
        device_mesh(None, 0)
    assert device_mesh(None, 2).shape == {"data": 4, "model": 2}
    assert device_mesh(2, 4).devices.tolist() == [jax.devices()[:4], jax.devices()[4:]]
    with pytest.raises(ValueError, match=r"shards no layer: no hidden width in \[7, 6, 5\] divides by 4"):
        DataParallel(device_mesh(2, 4)).wrap(LiftedTrainer(LiftedConfig(), MLP))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        DataParallel(jax.make_mesh((2, 4), ("data", "pipeline")))
    from configs import tiny
    from experiments.train import validate_config

    c = tiny.get_config()
    c.mesh_model = 0
    with pytest.raises(ValueError, match="mesh_model=0 must be ≥ 1"):
        validate_config(c)


def test_a_trainer_without_layer_specs_runs_on_a_data_mesh_and_is_refused_a_model_axis():
    """`Trainer` does not require `layers`: any trainer shards over samples; only a model axis needs the specs."""
    class Bare(Trainer):  # plain gradient descent, no `layers` attribute
        def init(self, params):
            return params

        def step(self, state, x, y):
            def loss(p):
                h = jax.nn.relu(x @ p[0]["kernel"] + p[0]["bias"])
                return optax.softmax_cross_entropy(h @ p[1]["kernel"] + p[1]["bias"], y).mean()

            value, grad = jax.value_and_grad(loss)(state)
            return jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, state, grad), StepInfo(value, ~jnp.isfinite(value))

        def params(self, state):
            return state

    layers = (Dense(8), Dense(3))
    x, y = _data(32, (5,), 3)
    params = init_params(jax.random.PRNGKey(1), layers, (5,), jnp.float64)
    single, sharded = Bare(), DataParallel(data_mesh(8)).wrap(Bare())
    _close(sharded.step(sharded.init(params), x, y)[0], single.step(params, x, y)[0])
    with pytest.raises(ValueError, match="needs the trainer's layer specs"):
        DataParallel(device_mesh(2, 4)).wrap(Bare())


def test_model_axis_mesh_keeps_each_model_row_within_a_process(monkeypatch):
    """Two simulated hosts of 4 devices: a 4 × 2 mesh has rows (0, 1), (2, 3), (4, 5), (6, 7); 2 × 2 takes the first
    two devices of each host; a model axis of 8 would span both hosts and is refused."""
    import types

    from fenchel import sharding

    devices = [types.SimpleNamespace(id=i, process_index=i // 4, platform="cpu") for i in range(8)]
    meshes = []
    monkeypatch.setattr(jax, "devices", lambda: devices)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "make_mesh", lambda shape, names, axis_types=None, devices=None:
                        meshes.append((shape, names, [d.id for d in devices])))
    sharding.device_mesh(None, 2)
    sharding.device_mesh(2, 2)
    assert meshes == [((4, 2), ("data", "model"), list(range(8))), ((2, 2), ("data", "model"), [0, 1, 4, 5])]
    with pytest.raises(ValueError, match="a multiple of the model axis"):
        sharding.device_mesh(1, 8)


def test_launcher_model_axis_run_resumes_to_the_uninterrupted_figures(tmp_path):
    """configs/tiny.py (784-32-10) on a 2 × 4 mesh, in this process: a run interrupted after its first epoch resumes
    from its checkpoint (saved from the gathered model-sharded state, placed back on the mesh) to the same figures
    as the uninterrupted one. (The launcher test above matches a data × model mesh with one device.)"""
    from configs import tiny
    from experiments.train import train_and_evaluate

    c = tiny.get_config()
    c.update(dict(train_size=400, test_size=200, total_epochs=2, warm_start_epochs=0, batch_size=40,
                  objective_batch=120, mesh_data=2, mesh_model=4))
    whole = train_and_evaluate(c, tmp_path / "whole")
    assert train_and_evaluate(c, tmp_path / "resumed", max_epochs_this_run=1) == {"interrupted_after_epoch": 1}
    resumed = train_and_evaluate(c, tmp_path / "resumed")
    for key in ("train_loss", "lifted_objective", "test_accuracy"):
        np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-6)
