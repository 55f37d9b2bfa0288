"""experiments.start_study: the start phase is what it says, checked against a numpy forward pass."""

from pathlib import Path

import numpy as np
import pytest

from experiments import start_study
from experiments.configs_util import load_config
from experiments.train import Job

ROOT = Path(__file__).resolve().parent.parent


def _tiny():
    config = load_config(ROOT / "configs" / "tiny.py")
    config.progress = False
    return config


def _np_accuracy(job, params):
    x = np.asarray(job.data.x_test, np.float64)
    for p in params[:-1]:
        x = np.maximum(x @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), 0.0)
    logits = x @ np.asarray(params[-1]["kernel"]) + np.asarray(params[-1]["bias"])
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(job.data.y_test)))


def test_starts_are_random_sgd_or_readout_first():
    """No start phase: the first record is the initial network (numpy forward pass). SGD and readout-first
    starts move it; each lifted epoch adds one record."""
    config = _tiny()
    job = Job(config)
    plain = start_study.run(config, epochs=1, log=lambda m: None)
    assert plain[0]["phase"] == "random initialisation" and len(plain) == 2
    assert plain[0]["test_accuracy"] == pytest.approx(_np_accuracy(job, job.params0), abs=1e-12)
    sgd = start_study.run(config, sgd_examples=800, epochs=0, log=lambda m: None)
    readout = start_study.run(config, readout_examples=800, epochs=0, log=lambda m: None)
    assert sgd[0]["train_loss"] < plain[0]["train_loss"] and readout[0]["train_loss"] < plain[0]["train_loss"]
    with pytest.raises(ValueError, match="one start"):
        start_study.run(config, sgd_examples=10, readout_examples=10)
