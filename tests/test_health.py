"""Non-finite steps never reach the weights: skipped and counted, or the run restores, or it stops."""
import math

import jax
import numpy as np
import pytest

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.objectives import lm
from kslm_jax.train import health


def _fit(wd, monkeypatch, nan_step, *overrides):
    monkeypatch.setenv("KSLM_FAULT_NAN_AT_STEP", str(nan_step))
    cfg = workdir_lib.config_for(wd, None, ["train.steps=12", "checkpoint.every_steps=4", *overrides], force=True)
    trainer = lm.trainer(cfg, wd)
    return trainer, trainer.fit()


def test_skip_counts_and_keeps_weights_finite(workdir, monkeypatch):
    trainer, summary = _fit(workdir, monkeypatch, 6)
    assert summary["nonfinite"] == 1 and summary["step"] == 12
    assert math.isnan(summary["losses"][6]) and all(math.isfinite(summary["losses"][s]) for s in range(7, 13))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.params))
    assert summary["losses"][12] < summary["losses"][1]


def test_restore_goes_back_to_the_last_checkpoint(workdir, monkeypatch, caplog):
    trainer, summary = _fit(workdir, monkeypatch, 6, "train.nonfinite=restore")
    assert "restored the weights of checkpoint step 4" in caplog.text
    assert summary["step"] == 12 and summary["nonfinite"] == 1


def test_raise_stops_with_a_clear_error(workdir, monkeypatch):
    with pytest.raises(KslmError, match="non-finite"):
        _fit(workdir, monkeypatch, 6, "train.nonfinite=raise")


def test_spike_detector():
    h = health.Health("restore", zscore=6.0, warmup=10)
    rng = np.random.default_rng(0)
    actions = [h.observe(s, 3.0 + 0.01 * rng.standard_normal(), False) for s in range(50)]
    assert actions == [None] * 50 and h.spikes == 0
    assert h.observe(50, 4.0, False) == "restore" and h.spikes == 1
    assert h.observe(51, 3.0, False) is None
    assert health.Health("skip", 6.0).observe(1, float("nan"), True) is None
