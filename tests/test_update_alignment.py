"""experiments.update_alignment: the update-against-gradient diagnostic, checked on plain SGD by hand."""

from pathlib import Path

import numpy as np
import pytest

from experiments.configs_util import load_config
from experiments.train import Job
from experiments.update_alignment import run

ROOT = Path(__file__).resolve().parent.parent


def _job(**overrides):
    config = load_config(ROOT / "configs" / "tiny.py")
    config.update(dict(progress=False, **overrides))
    return Job(config)


def test_plain_sgd_update_is_minus_lr_times_the_gradient():
    """SGD without momentum: ΔW = −lr·g, so every layer's cos is 1 and ‖ΔW‖ = lr‖g‖; the whole update's loss
    change is negative for a small step. A sign flip, a gradient of another batch or a stale state fails it."""
    lr = 0.01
    records = run(_job(trainer="sgd", momentum=0.0, learning_rate=lr), steps=5, every=2, log=lambda *_: None)
    assert [r["step"] for r in records] == [0, 2, 4]
    for rec in records:
        assert rec["dL"] < 0
        for layer in rec["layers"]:
            assert layer["cos"] == pytest.approx(1.0, abs=1e-5)
            assert layer["update_norm"] == pytest.approx(lr * layer["grad_norm"], rel=1e-4)


def test_lifted_records_every_layer_and_rejects_bad_counts():
    job = _job(trainer="fenchel")
    records = run(job, steps=2, every=1, log=lambda *_: None)
    assert len(records) == 2 and all(len(r["layers"]) == len(job.layers) for r in records)
    assert all(-1.0 <= layer["cos"] <= 1.0 and np.isfinite(layer["dL"]) for r in records for layer in r["layers"])
    with pytest.raises(ValueError, match="--steps"):
        run(job, steps=0, every=1)
