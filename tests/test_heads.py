"""Multi-branch heads (GuideBP and the sum / mean merges): merges, weakness scores, trainers, launcher.

Expected values are written here in numpy from the definitions in `fenchel.heads` (softmax cross-entropy by
log-sum-exp, per-class means by loops over samples, one SGD step by hand-written backprop). The lifted blocks of a
merged head are tested against SciPy in tests/test_blocks.py.
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import fenchel
from experiments.configs_util import load_config
from experiments.tables import write_tables
from experiments.train import train_and_evaluate, validate_config
from experiments.workdir import Workdir
from fenchel import heads
from fenchel.heads import MERGES, Head
from fenchel.proxprop import ProxPropTrainer

ROOT = Path(__file__).resolve().parent.parent
N, N_IN, HIDDEN, C, K = 24, 6, 5, 4, 3


def ce(y, logits):
    """Per-sample softmax cross-entropy −Σ_c y_c log softmax(u)_c (numpy)."""
    return -np.sum(y * special.log_softmax(logits, axis=-1), axis=-1)


def data(seed=0, n=N, classes=None):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C if classes is None else rng.choice(classes, n)
    return rng.normal(size=(n, N_IN)), np.eye(C)[labels]


def net_params(seed=0, out=C):
    rng = np.random.default_rng(seed + 100)
    return [{"kernel": jnp.asarray(rng.normal(size=(a, b)) * 0.5), "bias": jnp.asarray(rng.normal(size=b) * 0.1)}
            for a, b in ((N_IN, HIDDEN), (HIDDEN, out))]


NET = fenchel.layers.mlp((N_IN, HIDDEN, C))
PEN = fenchel.get_penalty("relu")


# ---------------------------------------------------------------- merges
def test_merged_logits_follow_the_definitions():
    """U M: Σ_k U_k (sum), (1/K)Σ_k U_k (mean), U_{s_c, c} (guide), U_k the columns kC..kC+C−1."""
    u = np.random.default_rng(1).normal(size=(N, K * C))
    branches = [u[:, k * C:(k + 1) * C] for k in range(K)]
    sel = np.array([1, 2, 0, 1])
    expected = {"sum": sum(branches), "mean": sum(branches) / K,
                "guide": np.column_stack([branches[sel[c]][:, c] for c in range(C)])}
    for merge in MERGES:
        m = heads.merge_matrix(merge, K, C, jnp.asarray(sel), jnp.float64)
        np.testing.assert_allclose(u @ np.asarray(m), expected[merge], atol=1e-12)
        # the curvature factor ‖M‖₂² used by the lifted blocks
        assert heads.merge_norm_sq(merge, K) == pytest.approx(np.linalg.norm(np.asarray(m), 2) ** 2, rel=1e-12)


def test_one_branch_every_merge_is_the_plain_head():
    """K = 1: M = I for every merge, the loss is the plain cross-entropy, and expand / collapse change nothing."""
    x, y = data(2)
    u = np.random.default_rng(3).normal(size=(N, C))
    params = net_params()
    for merge in MERGES:
        head = Head(1, merge)
        np.testing.assert_array_equal(np.asarray(heads.merge_matrix(merge, 1, C, jnp.zeros(C, int))), np.eye(C))
        loss, _ = head.batch_loss(head.init_state(params), jnp.asarray(u), jnp.asarray(y))
        assert float(loss) == pytest.approx(np.mean(ce(y, u)), rel=1e-12)
        for a, b in zip(head.collapse(head.expand(params)), params):
            np.testing.assert_array_equal(a["kernel"], b["kernel"])
            np.testing.assert_array_equal(a["bias"], b["bias"])


@pytest.mark.parametrize("make", [
    lambda h: fenchel.GradientTrainer(NET, PEN, fenchel.make_optimizer("adam", 1e-2), head=h),
    lambda h: ProxPropTrainer(NET, PEN, head=h),
    lambda h: fenchel.LiftedTrainer(fenchel.LiftedConfig(), NET, head=h),
], ids=["adam", "proxprop", "lifted"])
def test_one_branch_guide_trains_as_the_plain_trainer(make):
    """Through a trainer: K = 1 with the guide merge (weakness scores kept and used) takes the plain steps."""
    x, y = data(4)
    params = net_params(4)
    plain, guided = make(None), make(Head(1, "guide"))
    s_plain, s_guided = plain.init(params), guided.init(params)
    for _ in range(3):
        s_plain, _ = plain.step(s_plain, x, y)
        s_guided, _ = guided.step(s_guided, x, y)
    for a, b in zip(plain.params(s_plain), guided.params(s_guided)):
        np.testing.assert_allclose(a["kernel"], b["kernel"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a["bias"], b["bias"], rtol=1e-12, atol=1e-14)


def test_expand_keeps_the_given_head_and_collapse_is_the_mean_of_the_branches():
    """Branch 0 is the given output layer; the evaluation network's logits are (1/K) Σ_k (H W_k + b_k)."""
    params = net_params(5)
    head = Head(K, "guide", seed=7)
    wide = head.expand(params)
    w, b = np.asarray(wide[1]["kernel"]), np.asarray(wide[1]["bias"])
    assert w.shape == (HIDDEN, K * C)
    np.testing.assert_array_equal(w[:, :C], params[1]["kernel"])
    np.testing.assert_array_equal(b[:C], params[1]["bias"])
    assert not np.allclose(w[:, C:2 * C], w[:, 2 * C:])  # the extra branches differ
    h = np.random.default_rng(6).normal(size=(N, HIDDEN))
    mean_logits = sum(h @ w[:, k * C:(k + 1) * C] + b[k * C:(k + 1) * C] for k in range(K)) / K
    out = head.collapse(wide)[1]
    np.testing.assert_allclose(h @ np.asarray(out["kernel"]) + np.asarray(out["bias"]), mean_logits, atol=1e-12)


# ---------------------------------------------------------------- weakness scores
def ref_class_losses(u, y):
    """ℓ[k, c]: mean over the samples of class c of branch k's own cross-entropy (loops over samples)."""
    labels = np.argmax(y, 1)
    ell = np.zeros((K, C))
    for k in range(K):
        per = ce(y, u[:, k * C:(k + 1) * C])
        for c in range(C):
            if np.any(labels == c):
                ell[k, c] = np.mean(per[labels == c])
    return ell


def test_weakness_scores_update_as_defined():
    """First sight of a class: w = ℓ; later: w ← β w + (1 − β) ℓ; a class absent from the batch keeps its w;
    the guide selects argmax_k w_{k,c}."""
    beta = 0.7
    head = Head(K, "guide", decay=beta)
    rng = np.random.default_rng(8)
    _, y1 = data(9, classes=[0, 1, 2])  # class 3 absent
    _, y2 = data(10, classes=[0, 3])  # classes 1, 2 absent
    u1, u2 = rng.normal(size=(N, K * C)) * 2, rng.normal(size=(N, K * C)) * 2
    state = head.init_state(net_params(out=K * C))
    state = head.observe(state, jnp.asarray(u1), jnp.asarray(y1))
    l1, l2 = ref_class_losses(u1, y1), ref_class_losses(u2, y2)
    expected = l1.copy()
    expected[:, 3] = 0.0
    np.testing.assert_allclose(state.score, expected, rtol=1e-12)
    np.testing.assert_array_equal(state.seen, [True, True, True, False])
    state = head.observe(state, jnp.asarray(u2), jnp.asarray(y2))
    expected[:, 0] = beta * l1[:, 0] + (1 - beta) * l2[:, 0]
    expected[:, 3] = l2[:, 3]
    np.testing.assert_allclose(state.score, expected, rtol=1e-12)
    np.testing.assert_array_equal(state.seen, [True] * 4)
    np.testing.assert_array_equal(heads.selection(state), np.argmax(expected, axis=0))
    # sum and mean keep no scores
    assert Head(K, "mean").observe(state, jnp.asarray(u1), jnp.asarray(y1)) is state


def test_per_sample_guided_loss_is_at_least_every_branch_loss():
    """g_y = min_k U_{k,y}, g_c = max_k U_{k,c} (c ≠ y): CE(y, g) ≥ CE(y, U_k) for every k, since CE rises with each
    wrong-class logit and falls with the true-class one; equality for K = 1."""
    rng = np.random.default_rng(11)
    y = np.eye(C)[rng.integers(0, C, 500)]
    u = rng.normal(size=(500, K * C)) * 3
    g = np.asarray(heads.per_sample_guided_logits(jnp.asarray(u), jnp.asarray(y), K))
    stacked = u.reshape(500, K, C)
    np.testing.assert_array_equal(g, np.where(y > 0, stacked.min(1), stacked.max(1)))
    guided = ce(y, g)
    branch = np.stack([ce(y, stacked[:, k]) for k in range(K)], axis=1)
    assert np.all(guided[:, None] >= branch - 1e-12)
    assert np.mean(guided > branch.max(1) + 1e-6) > 0.9  # strictly above the worst branch almost always
    one = rng.normal(size=(500, C))
    np.testing.assert_allclose(ce(y, np.asarray(heads.per_sample_guided_logits(jnp.asarray(one), jnp.asarray(y), 1))),
                               ce(y, one), rtol=1e-12)


# ---------------------------------------------------------------- trainers
def test_one_guided_sgd_step_by_hand():
    """Plain SGD (no momentum), K = 3, guide: the step updates the scores from the current logits, selects
    s_c = argmax_k w_{k,c}, and descends (1/N) Σ CE(Y, U M): ∇W₁ = Hᵀ G Mᵀ / N, ∇b₁ = 1ᵀ G Mᵀ / N with
    G = softmax(U M) − Y, and backprop through relu into layer 0. Unselected columns do not move."""
    x, y = data(12)
    params = net_params(12)
    lr = 0.3
    head = Head(K, "guide", seed=3)
    trainer = fenchel.GradientTrainer(NET, PEN, fenchel.make_optimizer("sgd", lr, momentum=0.0), head=head)
    state = trainer.init(params)
    p = [{k: np.asarray(v) for k, v in layer.items()} for layer in state[0]]
    state, info = trainer.step(state, x, y)

    pre = x @ p[0]["kernel"] + p[0]["bias"]
    h = np.maximum(pre, 0)
    u = h @ p[1]["kernel"] + p[1]["bias"]
    sel = np.argmax(ref_class_losses(u, y), axis=0)
    m = np.zeros((K * C, C))
    m[sel * C + np.arange(C), np.arange(C)] = 1.0
    logits = u @ m
    g = (special.softmax(logits, axis=1) - y) / N
    assert float(info.loss) == pytest.approx(np.mean(ce(y, logits)), rel=1e-12)
    gu = g @ m.T
    dh = gu @ p[1]["kernel"].T * (pre > 0)
    expected = [{"kernel": p[0]["kernel"] - lr * x.T @ dh, "bias": p[0]["bias"] - lr * dh.sum(0)},
                {"kernel": p[1]["kernel"] - lr * h.T @ gu, "bias": p[1]["bias"] - lr * gu.sum(0)}]
    for got, want in zip(state[0], expected):
        np.testing.assert_allclose(got["kernel"], want["kernel"], atol=1e-12)
        np.testing.assert_allclose(got["bias"], want["bias"], atol=1e-12)
    free = np.flatnonzero(m.sum(1) == 0)
    np.testing.assert_array_equal(np.asarray(state[0][1]["kernel"])[:, free], p[1]["kernel"][:, free])
    np.testing.assert_array_equal(np.asarray(heads.selection(state[2])), sel)


def test_lifted_guided_step_fixes_the_selection_of_the_updated_scores():
    """One lifted minibatch step, K = 3, guide, W blocks solved tightly: every output column no class selects
    (selection from the scores updated with the forward pass's logits) ends at ρ'/(ρ + ρ')·its old value, and
    its bias stays (the block minimiser of ρ‖W‖² + ρ'‖(W, b) − anchor‖²)."""
    x, y = data(13)
    params = net_params(13)
    rho, rho_prox = 1e-2, 0.1
    cfg = fenchel.LiftedConfig(rho=rho, rho_prox=rho_prox, w_tol=1e-13, w_max_steps=5000)
    trainer = fenchel.LiftedTrainer(cfg, NET, head=Head(K, "guide", seed=5))
    state = trainer.init(params)
    p = [{k: np.asarray(v) for k, v in layer.items()} for layer in state[0]]
    state, _ = trainer.step(state, x, y)
    u = np.maximum(x @ p[0]["kernel"] + p[0]["bias"], 0) @ p[1]["kernel"] + p[1]["bias"]
    sel = np.argmax(ref_class_losses(u, y), axis=0)
    np.testing.assert_array_equal(np.asarray(heads.selection(state[1])), sel)
    chosen = sel * C + np.arange(C)
    free = np.setdiff1d(np.arange(K * C), chosen)
    new = state[0][1]
    shrunk = rho_prox / (rho + rho_prox) * p[1]["kernel"]
    np.testing.assert_allclose(np.asarray(new["kernel"])[:, free], shrunk[:, free], atol=1e-10)
    np.testing.assert_allclose(np.asarray(new["bias"])[free], p[1]["bias"][free], atol=1e-10)
    assert not np.allclose(np.asarray(new["kernel"])[:, chosen], shrunk[:, chosen])


# ---------------------------------------------------------------- launcher
def tiny(**overrides):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(overrides)
    return config


@pytest.mark.parametrize("override, message", [
    ({"branches": 0}, "branches=0 must be an integer ≥ 1"),
    ({"branches": True}, "branches=True must be an integer"),
    ({"merge": "max"}, "merge='max', expected one of"),
    ({"merge": "max", "trainer": "adam"}, "merge='max'"),
    ({"branches": -2, "trainer": "proxprop"}, "branches=-2"),
])
def test_bad_head_fields_fail_before_compute(override, message):
    with pytest.raises(ValueError, match=message):
        validate_config(tiny(**override))


def test_guided_lifted_run_resumes_exactly_and_warm_starts(tmp_path):
    """The weakness scores live in the checkpointed state: an interrupted run ends as an uninterrupted one; the
    warm start fine-tunes the evaluation network (mean of the branches)."""
    config = tiny(branches=3, merge="guide", train_size=400, total_epochs=2)
    full = train_and_evaluate(config, tmp_path / "full")
    assert train_and_evaluate(config, tmp_path / "cut", max_epochs_this_run=1) == {"interrupted_after_epoch": 1}
    resumed = train_and_evaluate(config, tmp_path / "cut")
    a, b = Workdir(tmp_path / "full").read_metrics(), Workdir(tmp_path / "cut").read_metrics()
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert [r["guide_selection"] for r in a] == [r["guide_selection"] for r in b]
    assert full["test_accuracy"] == resumed["test_accuracy"]
    assert full["test_accuracy"] > 0.3 and full["warm_start_test_accuracy"] > 0.3  # 8 steps; chance is 0.1


def test_merges_are_table_columns_without_special_cases(tmp_path):
    runs = []
    for merge in MERGES:
        d = tmp_path / merge
        train_and_evaluate(tiny(trainer="adam", branches=3, merge=merge, train_size=400, total_epochs=1), d)
        runs.append(d)
    md = write_tables(runs, tmp_path / "table")
    header = md.splitlines()[0]
    for merge in MERGES:
        acc = 100 * json.loads((tmp_path / merge / "summary.json").read_text())["test_accuracy"]
        assert f"Adam (merge={merge})" in header
        assert f"{acc:.2f} ± 0.00 (n=1)" in md


def test_a_lifted_trainer_rebuilt_with_another_config_keeps_its_head():
    trainer = fenchel.LiftedTrainer(fenchel.LiftedConfig(), NET, head=Head(K, "guide"))
    other = trainer.with_config(fenchel.LiftedConfig(w_mode="primal_mm"))
    assert other.head == trainer.head and other.layers == trainer.layers and other.config.w_mode == "primal_mm"
    assert other.layers[-1].features == K * C and other.eval_layers[-1].features == C
