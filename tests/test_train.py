"""Training: loss falls, TensorBoard events are readable, bf16 works, resume is bit-exact."""
import jax
import numpy as np
import pytest
from conftest import committed_steps

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.objectives import lm


def _trainer(wd, *overrides):
    cfg = workdir_lib.config_for(wd, None, list(overrides), force=True)
    return lm.trainer(cfg, wd)


def test_loss_falls_and_tensorboard_is_readable(workdir):
    summary = _trainer(workdir, "train.steps=30").fit()
    losses = summary["losses"]
    assert np.mean([losses[s] for s in (1, 2, 3)]) - np.mean([losses[s] for s in (28, 29, 30)]) > 1.0
    assert summary["eval"]["bits_per_char"] > 0
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "eval/bits_per_char"):
        assert tag in tags, tag
    assert len(acc.Scalars("train/loss")) == 30
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(losses[30], rel=1e-5)


# Gradient accumulation: tests/test_grad_accum.py checks the exact gradient for every objective.


def test_bf16_compute_with_fp32_master_weights(workdir):
    t = _trainer(workdir, "train.steps=12", "model.dtype=bfloat16")
    summary = t.fit()
    assert summary["losses"][12] < summary["losses"][1] - 0.3
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(t.state.params))


def _stop_by(run, wd, sig, at, resumed_from=None):
    """`kslm train` that sends itself `sig` after step `at`: it must save that step and say so."""
    err = run.finish(wd, KSLM_FAULT_SIGTERM_AT_STEP=str(at), KSLM_FAULT_SIGNAL=sig)
    if resumed_from is not None:
        assert f"restored checkpoint step {resumed_from}" in err, err[-3000:]
    assert f"SIG{sig} received: saved checkpoint at step {at}" in err, err[-3000:]
    assert committed_steps(wd)[-1] == at


def test_signals_save_and_resume_is_bit_exact(uninterrupted, tmp_path):
    """SIGTERM, then SIGINT on the resumed run, each between two regular saves (every 2 steps of 16); the third
    start finishes with every logged loss and every parameter of the uninterrupted run, exactly."""
    run = uninterrupted
    wd = run.copy(tmp_path / "run")
    _stop_by(run, wd, "TERM", 5)
    _stop_by(run, wd, "INT", 9, resumed_from=5)
    assert "restored checkpoint step 9" in run.finish(wd)
    assert run.losses_of(wd) == run.losses and len(run.losses) == 16     # every step 1..16, exactly
    step, params = run.params_of(wd)
    assert run.step == step == 16
    for a, b in zip(params, run.params):
        np.testing.assert_array_equal(a, b)


# kill -9 at a random moment (mid-save included): tests/faults/test_kill.py.
