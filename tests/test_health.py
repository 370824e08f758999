"""Non-finite steps never reach the weights: skipped and counted, or the run restores, or it stops."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import committed_steps

from kslm_jax.core import checkpoint
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.objectives import lm
from kslm_jax.train import health, optim
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib


def _fit(wd, monkeypatch, nan_step, *overrides):
    monkeypatch.setenv("KSLM_FAULT_NAN_AT_STEP", str(nan_step))
    cfg = workdir_lib.config_for(wd, None, ["train.steps=12", "checkpoint.every_steps=4", *overrides], force=True)
    trainer = lm.trainer(cfg, wd)
    return trainer, trainer.fit()


def test_skip_counts_keeps_weights_finite_and_logs_the_applied_lr(workdir, monkeypatch):
    trainer, summary = _fit(workdir, monkeypatch, 6)
    assert summary["nonfinite"] == 1 and summary["step"] == 12
    assert math.isnan(summary["losses"][6]) and all(math.isfinite(summary["losses"][s]) for s in range(7, 13))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.params))
    assert summary["losses"][12] < summary["losses"][1]
    # A skipped step does not advance the schedule: optax counted 11 applied updates in 12 steps, and every
    # logged rate is the schedule at the updates applied before that step, the rate the step used.
    assert int(optim.schedule_count(trainer.state.opt_state, None)) == 11
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
           if "train/lr" in r}
    want = {s: float(trainer.lr_fn(s - 1 if s <= 6 else s - 2)) for s in range(1, 13)}
    assert lrs == pytest.approx(want, rel=1e-6)
    assert want[7] != pytest.approx(float(trainer.lr_fn(6)), rel=1e-3)  # the old log showed lr_fn(step)


def test_skipped_steps_in_a_row_stop_with_the_last_good_state_saved(workdir, monkeypatch):
    with pytest.raises(KslmError, match=r"steps in a row had a non-finite loss, gradient or update "
                                        r"\(train.max_skipped_steps=3\); the run stopped at step 8"):
        _fit(workdir, monkeypatch, "5-8", "train.max_skipped_steps=3")
    assert committed_steps(workdir) == [4, 8]
    t = lm.trainer(workdir_lib.config_for(workdir, None, []), workdir)
    with jax.set_mesh(t.mesh):
        last = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)[1].params
        shutil.rmtree(workdir / "checkpoints" / "8")
        good = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)[1].params
    for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(good)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_non_finite_update_is_not_applied():
    """Finite loss and gradient, NaN learning rate: the update is NaN, and the step keeps the old weights."""
    params = {"w": jnp.ones((3, 2))}

    def loss(p, extra, batch, rng):
        total = jnp.sum(p["w"] * batch["x"])
        return total, {"ce_sum": total, "z_sum": jnp.zeros(()), "tokens": jnp.int32(1)}
    tx = optax.sgd(float("nan"))
    state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                 rng=jax.random.PRNGKey(0))
    new, out = step_lib.train_step(state, {"x": jnp.ones((3, 2))}, loss=loss, tx=tx, lr_fn=lambda c: 0.1, accum=1)
    assert np.isfinite(float(out["grad_norm"])) and np.isfinite(float(out["ce_sum"]))
    assert int(out["nonfinite"]) == 1 and int(new.step) == 1
    np.testing.assert_array_equal(np.asarray(new.params["w"]), np.ones((3, 2)))


def test_restore_goes_back_to_the_last_checkpoint(workdir, monkeypatch, caplog):
    trainer, summary = _fit(workdir, monkeypatch, 6, "train.nonfinite=restore")
    assert "restored the weights of checkpoint step 4" in caplog.text
    assert summary["step"] == 12 and summary["nonfinite"] == 1


def test_raise_stops_with_a_clear_error(workdir, monkeypatch):
    with pytest.raises(KslmError, match="non-finite"):
        _fit(workdir, monkeypatch, 6, "train.nonfinite=raise")


def test_consecutive_skips_are_counted_and_reset():
    h = health.Health("skip", 0.0, max_skipped=2)
    assert [h.observe(s, v, not math.isfinite(v)) for s, v in enumerate([3.0, math.nan, 2.9, math.nan])] == [None] * 4
    assert h.observe(4, math.nan, True) == "stop" and h.in_a_row == 2
    assert health.Health("skip", 0.0).observe(1, math.nan, True) is None  # 0: no cap


def test_spike_detector():
    h = health.Health("restore", zscore=6.0, warmup=10)
    rng = np.random.default_rng(0)
    actions = [h.observe(s, 3.0 + 0.01 * rng.standard_normal(), False) for s in range(50)]
    assert actions == [None] * 50 and h.spikes == 0
    assert h.observe(50, 4.0, False) == "restore" and h.spikes == 1
    assert h.observe(51, 3.0, False) is None
    assert health.Health("skip", 6.0).observe(1, float("nan"), True) is None
