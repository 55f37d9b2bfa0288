"""Gradient-output sparsity: hand-counted zero fractions and skippable MACs, a conv loop count, the CLI end to end."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sparsity
from experiments.configs_util import load_config
from fenchel.layers import Conv, Dense
from fenchel.penalties import relu_penalty

ROOT = Path(__file__).resolve().parent.parent


def _summed(layers, params, x0, y, in_shape, lifted=None):
    """Layer records of one batch through the public pieces (batch_counts → layer_record)."""
    counts = jax.jit(lambda p, x, yy: sparsity.batch_counts(p, x, yy, layers, relu_penalty(), lifted))(params, x0, y)
    geometry = sparsity.layer_geometry(layers, in_shape)
    records = [sparsity.layer_record({k: np.asarray(v) for k, v in c.items()}, g, x0.shape[0])
               for c, g in zip(counts, geometry)]
    return records, sparsity.network_record(records)


def test_hand_built_two_layer_network():
    """3→2→2, 2 samples. X_0 = [[1,0,2],[0,0,1]], W_0 = [[1,−1],[0,1],[1,−1]] → U_0 = [[3,−3],[1,−1]],
    X_1 = [[3,0],[1,0]]; W_1 = I, logits = X_1, dense softmax gradient G_1; G_0 = G_1 ⊙ 1[U_0 > 0] has
    column 1 zero. By hand (R rows, K, C):
      layer 0 (R=2, K=3, C=2, no grad-input): fwd 12 MACs, skip #zeros(X_0)·C = 3·2 = 6;
        grad-weight 12, kept Σ_r nnz(z_r)·nnz(g_r) = 2·1 + 1·1 = 3 → skip 9. bwd 9/12, fwd+bwd 15/24.
      layer 1 (R=2, K=2, C=2): fwd 8, skip 2·2 = 4; grad-input 8, skip #zeros(G_1)·K = 0;
        grad-weight 8, kept 1·2 + 1·2 = 4 → skip 4. bwd 4/16, fwd+bwd 8/24.
      network: bwd (9 + 4)/(12 + 16) = 13/28, fwd+bwd (6 + 4 + 9 + 4)/48 = 23/48.
    """
    layers = (Dense(2), Dense(2))
    params = [{"kernel": jnp.array([[1.0, -1.0], [0.0, 1.0], [1.0, -1.0]]), "bias": jnp.zeros(2)},
              {"kernel": jnp.eye(2), "bias": jnp.zeros(2)}]
    x0 = jnp.array([[1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    (l0, l1), net = _summed(layers, params, x0, y, (3,))
    assert l0["zero_input"] == 3 / 6 and l0["zero_output_grad"] == 2 / 4
    assert l1["zero_input"] == 2 / 4 and l1["zero_output_grad"] == 0.0
    assert l0["macs"] == {"forward": 12, "grad_input": 0, "grad_weight": 12}
    assert l0["skippable_macs"] == {"forward": 6, "grad_input": 0, "grad_weight": 9}
    assert l1["macs"] == {"forward": 8, "grad_input": 8, "grad_weight": 8}
    assert l1["skippable_macs"] == {"forward": 4, "grad_input": 0, "grad_weight": 4}
    assert l0["skip_backward"] == pytest.approx(9 / 12) and l0["skip_forward_backward"] == pytest.approx(15 / 24)
    assert l1["skip_backward"] == pytest.approx(4 / 16) and l1["skip_forward_backward"] == pytest.approx(8 / 24)
    assert net["skip_backward"] == pytest.approx(13 / 28) and net["skip_forward_backward"] == pytest.approx(23 / 48)


def test_nothing_sparse_nothing_skipped():
    """Positive inputs and positive first-layer weights: every pre-activation > 0, so no zero anywhere."""
    layers = (Dense(2), Dense(2))
    params = [{"kernel": jnp.array([[1.0, 0.5], [0.2, 1.0], [0.3, 0.4]]), "bias": jnp.array([0.1, 0.1])},
              {"kernel": jnp.array([[1.0, 2.0], [3.0, -1.0]]), "bias": jnp.zeros(2)}]
    x0 = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.1, 0.7]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    records, net = _summed(layers, params, x0, y, (3,))
    for r in records:
        assert r["zero_input"] == 0 and r["zero_output_grad"] == 0
        assert r["skippable_macs"] == {"forward": 0, "grad_input": 0, "grad_weight": 0}
    assert net["skip_backward"] == 0 and net["skip_forward_backward"] == 0


def _loop_count(x, g, k, stride, pad):
    """Direct numpy loop over (sample, output position, kh, kw, c_in, c_out) of a conv's three products."""
    n, h, w, c_in = x.shape
    _, ho, wo, c_out = g.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    fwd = gin = gw = 0
    for s in range(n):
        for i in range(ho):
            for j in range(wo):
                for a in range(k):
                    for b in range(k):
                        for ci in range(c_in):
                            z = xp[s, i * stride + a, j * stride + b, ci]
                            for co in range(c_out):
                                gg = g[s, i, j, co]
                                fwd += z == 0
                                gin += gg == 0
                                gw += (z == 0) or (gg == 0)
    return int(fwd), int(gin), int(gw)


@pytest.mark.parametrize("padding,stride,pad", [("VALID", 1, 0), ("SAME", 1, 1), ("VALID", 2, 0)])
def test_conv_counts_match_a_numpy_loop(padding, stride, pad):
    rng = np.random.default_rng(0)
    spec = Conv(3, 3, stride=stride, padding=padding)
    x = rng.normal(size=(2, 6, 6, 2)) * (rng.random((2, 6, 6, 2)) < 0.5)
    ho, wo, _ = spec.out_shape(x.shape[1:])
    g = rng.normal(size=(2, ho, wo, 3)) * (rng.random((2, ho, wo, 3)) < 0.4)
    z = spec.patches(jnp.asarray(x))
    counts = sparsity.product_counts(z, jnp.asarray(g).reshape(z.shape[0], -1))
    fwd, gin, gw = _loop_count(x, g, 3, stride, pad)
    assert (int(counts["skip_forward"]), int(counts["skip_grad_input"]), int(counts["skip_grad_weight"])) == \
        (fwd, gin, gw)
    geometry = sparsity.layer_geometry((spec,), x.shape[1:])[0]
    assert sparsity.dense_macs(geometry, 2)["forward"] == 2 * ho * wo * 9 * 2 * 3  # per position k·k·C_in·C_out


def test_conv_network_gradient_zeros_are_the_inactive_units():
    """Hidden conv layer through batch_counts: dL/dU = 0 exactly where U ≤ 0 (ReLU), and the skippable MACs equal
    the numpy loop count with that zero pattern (catches rows of G misaligned with the patch rows)."""
    rng = np.random.default_rng(1)
    layers = (Conv(3, 2), Dense(4))
    x_np = rng.normal(size=(3, 5, 5, 1)) * (rng.random((3, 5, 5, 1)) < 0.6)
    x = jnp.asarray(x_np)
    params = [layers[0].init(jax.random.PRNGKey(0), (5, 5, 1), jnp.float64),
              layers[1].init(jax.random.PRNGKey(1), (4, 4, 3), jnp.float64)]
    params[0]["bias"] = jnp.array([0.1, -0.2, 0.0])
    y = jax.nn.one_hot(jnp.array([0, 3, 1]), 4)
    (l0, l1), _ = _summed(layers, params, x, y, (5, 5, 1))
    u = layers[0].linear_map(x, params[0]["kernel"]) + params[0]["bias"]
    assert l0["zero_output_grad"] == pytest.approx(float(jnp.mean(u <= 0)))
    assert l1["zero_input"] == pytest.approx(float(jnp.mean(u <= 0)))
    fwd, _, gw = _loop_count(x_np, np.asarray(u > 0, np.float64), 2, 1, 0)
    assert l0["skippable_macs"] == {"forward": fwd, "grad_input": 0, "grad_weight": gw}
    assert l0["zero_input"] == pytest.approx(float(np.mean(x_np == 0)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from experiments.train import train_and_evaluate

    config = load_config(ROOT / "configs" / "tiny.py")
    config.trainer = "adam"
    config.record_every = 10
    config.train_size = 400
    config.total_epochs = 1
    config.progress = False
    workdir = tmp_path_factory.mktemp("sparsity") / "run"
    train_and_evaluate(config, workdir)
    return workdir


def test_cli_end_to_end(tiny_run, capsys):
    sparsity.main(["--workdir", str(tiny_run), "--eval-size", "200", "--batch-size", "100"])
    table = capsys.readouterr().out
    assert "| layer |" in table and "| network |" in table
    out = json.loads((tiny_run / "sparsity" / "sparsity.json").read_text())
    assert (tiny_run / "sparsity" / "sparsity.png").stat().st_size > 0
    assert out["steps"] == [s["step"] for s in out["snapshots"]] and out["steps"][0] == 0
    assert out["lifted_settings"].startswith("config")
    for snap in out["snapshots"]:
        l0, l1 = snap["layers"]
        # ReLU: X_1 = 0 exactly where U_0 ≤ 0, which is where dL/dU_0 = 0 (barring exact zeros of dL/dX_1)
        assert l1["zero_input"] >= l0["zero_output_grad"] - 1e-12
        assert l0["lifted"]["zero_residual_forward"] == 1.0  # on the graph at the forward pass
        assert 0 <= l0["lifted"]["inactive_residual_after_x_step"] <= l0["lifted"]["zero_residual_after_x_step"] <= 1
        for r in snap["layers"]:
            assert 0 <= r["skip_backward"] <= 1 and 0 <= r["skip_forward_backward"] <= 1
            assert r["macs"]["forward"] == 200 * r["K"] * r["C"]


def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sparsity.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    no_history = tmp_path / "no_history"
    shutil.copytree(tiny_run, no_history)
    shutil.rmtree(no_history / "history")
    assert "record_every" in _cli_error(["--workdir", str(no_history)], capsys)
    assert "config.json" in _cli_error(["--workdir", str(tmp_path)], capsys)
    assert "multiple" in _cli_error(["--workdir", str(tiny_run), "--eval-size", "150"], capsys)
    assert "eval-size" in _cli_error(["--workdir", str(tiny_run), "--eval-size", "100000"], capsys)
