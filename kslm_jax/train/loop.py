"""The one training loop: any Objective's sharded steps, checkpoints, metrics, evaluation and clean exit.

The loop knows nothing of what is learned: the objective (train/objective.py) gives the loss, the state,
the frozen extras, the batches and the evaluation. Fault injection for the tests sits behind train/faults.py.
"""
from __future__ import annotations

import logging
import sys
import time

import jax
from tqdm.auto import tqdm

from kslm_jax.core import checkpoint, metrics, sharding
from kslm_jax.core.errors import KslmError
from kslm_jax.eval import runner
from kslm_jax.model import arch
from kslm_jax.train import debug_nans
from kslm_jax.train import faults as faults_lib
from kslm_jax.train import guards
from kslm_jax.train import health as health_lib
from kslm_jax.train import objective as objective_lib
from kslm_jax.train import oom
from kslm_jax.train import preemption
from kslm_jax.train import profiler as profiler_lib
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")


class Trainer:
    """Runs `objective` to cfg.train.steps; `state` is the live TrainState (None until restored or built)."""

    def __init__(self, objective: objective_lib.Objective):
        self.objective = o = objective
        s = o.setup
        self.cfg, self.workdir, self.paths, self.mesh, self.rules = s.cfg, s.workdir, s.paths, s.mesh, s.rules
        self.model_cfg, self.model, self.tx, self.lr_fn = s.model_cfg, s.model, s.tx, s.lr_fn
        self.abstract, self.shardings, self.extra = o.abstract, o.shardings, o.extra
        self.train_step = self._jit_step(o.loss)
        self._poisoned = None
        self.oom_context = (None, None)  # (step, batch) in flight, for the out-of-memory report
        self.state = None
        self.start_step = 0

    def _jit_step(self, loss):
        return step_lib.jit_train_step(loss, self.tx, self.lr_fn, self.cfg.train.grad_accum, self.mesh,
                                       self.shardings, self.objective.extra_shardings, self.rules)

    def _poisoned_step(self):
        if self._poisoned is None:
            self._poisoned = self._jit_step(faults_lib.poison(self.objective.loss))
        return self._poisoned

    def has_checkpoint(self) -> bool:
        return self.objective.setup.has_checkpoint()

    def init_fresh(self) -> None:
        self.state, self.start_step = self.objective.init_state(), 0

    def evaluate(self) -> dict:
        return self.objective.evaluate(self.state)

    def device_batch(self, batch: dict) -> dict:
        """A host batch from the objective's stream as the train step takes it: the objective's extra fields
        attached, then laid out over the mesh (micro-batches first when train.grad_accum > 1)."""
        return sharding.global_batch(self.objective.attach(batch), self.mesh, self.cfg.train.grad_accum)

    def lm_params(self):
        return self.objective.lm_params(self.state)

    def restore_or_init(self, mngr, data_iter) -> None:
        with jax.set_mesh(self.mesh):
            step, state = checkpoint.restore_latest(mngr, self.abstract, data_iter)
        if step is None:
            self.init_fresh()
        else:
            self.state, self.start_step = state, int(step)
            log.info("restored checkpoint step %d from %s", step, mngr.directory)

    def fit(self, on_eval=None) -> dict:
        """Train to cfg.train.steps from the newest checkpoint (or from scratch). Returns a summary."""
        try:
            return self._fit(on_eval)
        except Exception as e:  # noqa: BLE001 - only out of memory and a full disk are translated
            if oom.is_oom(e):
                raise oom.OutOfMemory(oom.explain(self, e)) from None
            if not guards.disk_full(e):
                raise
            done = sorted(int(p.name) for p in self.paths["checkpoints"].glob("*") if p.name.isdigit())
            raise KslmError(f"disk full while writing to {self.workdir}: checkpoints {done or 'none'} are intact "
                            "(a partial one is ignored); free space and run the same command to resume") from None

    def _fit(self, on_eval=None) -> dict:
        cfg = self.cfg
        tcfg = cfg.train
        data_iter = self.objective.batches()
        writer = metrics.Writer(self.workdir, cfg.logging.tensorboard)
        peak = metrics.device_peak_tflops(cfg.logging.peak_tflops)
        throughput = metrics.Throughput(arch.flops_per_token(self.model_cfg, cfg.data.seq_len),
                                        self.mesh.size, peak)
        summary = {"stopped_by": None, "losses": {}}
        self.health = health_lib.Health(tcfg.nonfinite, tcfg.spike_zscore, max_skipped=tcfg.max_skipped_steps)
        self._action = None
        self._restores = 0  # restores since the last checkpoint saved after one
        faults = faults_lib.Faults()
        profiler = profiler_lib.StepProfiler(self.paths["tensorboard"], cfg.logging.profile_steps,
                                             cfg.logging.profile_all_hosts)
        with checkpoint.manager(self.paths["checkpoints"], cfg.checkpoint) as mngr, preemption.StopSignal() as stop, \
                profiler:
            if self.state is None:
                self.restore_or_init(mngr, data_iter)
            step = self.start_step
            if step == 0:
                writer.text("config", f"```\n{cfg.to_json(indent=2)}\n```", 0)
            bar = tqdm(total=tcfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                       disable=not cfg.logging.progress_bar, file=sys.stderr,
                       mininterval=0.1 if sys.stderr.isatty() else 10.0)
            pending = None
            last_saved = step
            watchdog = guards.Watchdog(tcfg.step_timeout_s)
            with jax.set_mesh(self.mesh):
                while step < tcfg.steps and not stop.check(step):
                    batch = self.device_batch(next(data_iter))
                    step_fn = faults.step_fn(step + 1, self.train_step, self._poisoned_step)
                    self.oom_context = (step + 1, batch)
                    with profiler.step(step + 1):
                        self.state, out = step_fn(self.state, batch, self.extra)
                    step += 1
                    profiler.after(step, out)
                    # Read the previous step's metrics only now, so the device never waits on the host.
                    if pending is not None:
                        self._log(pending, writer, throughput, bar, summary)
                    pending = (step, out)
                    if tcfg.debug_nans:  # the next step must not move the weights before a bad one is re-run
                        self._log(pending, writer, throughput, bar, summary, force=step == tcfg.steps)
                        pending = None
                        if self.health.in_a_row:
                            self._finding, self._action = debug_nans.explain(self, batch, step), "debug_nans"
                    if self._action in _STOPS:
                        break
                    if self._action == "restore":
                        step, pending = self._restore_last(mngr), None
                        continue
                    throughput.add(self.objective.tokens_per_step)
                    # orbax's save policy decides the cadence; the final step is always saved
                    if checkpoint.save(mngr, step, self.state, data_iter, force=step == tcfg.steps):
                        last_saved, self._restores = step, 0
                    checkpoint.seal(mngr)
                    if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                        self._eval_and_log(writer, step, on_eval)
                    faults.after_step(step)
                    watchdog.beat(step)
                if pending is not None:
                    self._log(pending, writer, throughput, bar, summary, force=True)
                # Skipped steps never touched the weights, so the state saved here is the last good one.
                if (stop.received is not None or self._action in _STOPS) and last_saved != step:
                    checkpoint.save(mngr, step, self.state, data_iter, force=True)
                mngr.wait_until_finished()
                checkpoint.seal(mngr)
            watchdog.close()
            bar.close()
        summary["step"] = step
        summary.update(nonfinite=self.health.nonfinite, spikes=self.health.spikes)
        if self._action in _STOPS:
            writer.close()
            why = ("non-finite loss or gradient (train.nonfinite=raise)" if self._action == "raise" else
                   self._finding.describe() + " (train.debug_nans=true)" if self._action == "debug_nans" else
                   f"{self.health.in_a_row} steps in a row had a non-finite loss, gradient or update "
                   f"(train.max_skipped_steps={tcfg.max_skipped_steps})")
            raise KslmError(f"{why}; the run stopped at step {step} with its last good state saved; "
                            "lower optim.lr or inspect the data, then resume")
        if stop.received is not None:
            summary["stopped_by"] = stop.received
            log.info("%s received: saved checkpoint at step %d; resume with the same command", stop.received, step)
        elif step >= tcfg.steps:
            summary["eval"] = self._eval_and_log(writer, step, on_eval)
        writer.close()
        return summary

    def _restore_last(self, mngr) -> int:
        """Back to the newest checkpoint's weights; the data iterator keeps going, skipping the bad batches."""
        self._restores += 1
        if self._restores > 3:
            raise KslmError("the run went back to its last checkpoint 3 times and failed again each time; "
                            "the data is not the cause: lower optim.lr or check the model, then resume")
        mngr.wait_until_finished()
        ck_step, state = checkpoint.restore_latest(mngr, self.abstract, None)
        if ck_step is None:
            self.init_fresh()
            ck_step = 0
        else:
            self.state = state
        self._action = None
        log.warning("restored the weights of checkpoint step %d; training goes on with the batches after the "
                    "offending ones", ck_step)
        return int(ck_step)

    def _eval_and_log(self, writer, step, on_eval):
        t0 = time.perf_counter()
        result = self.evaluate()
        if self.cfg.eval.tasks:  # benchmark tasks on the same schedule; their files are written under eval/
            result.update(runner.during_training(self, step))
        writer.scalars(step, {f"eval/{k}": v for k, v in result.items() if k != "tokens"})
        if on_eval:
            on_eval(step, result, time.perf_counter() - t0)
        return result

    def _log(self, pending, writer, throughput, bar, summary, force=False):
        step, out = pending
        out = jax.device_get(out)
        tokens = max(int(out["tokens"]), 1)
        loss = float(out["ce_sum"]) / tokens
        summary["losses"][step] = loss
        self._action = self.health.observe(step, loss, bool(out["nonfinite"])) or self._action
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step % self.cfg.train.log_every and not force:
            return
        values = {"train/loss": loss, "train/z_loss": float(out["z_sum"]) / tokens,
                  "train/grad_norm": float(out["grad_norm"]), "train/lr": float(out["lr"]),
                  "train/param_norm": float(out["param_norm"]), **self.health.scalars()}
        # Objective-specific terms (distillation KL, agreement, ...): sums become per-token means.
        for k, v in out.items():
            if k in _STEP_KEYS:
                continue
            name = k[:-4] if k.endswith("_sum") else k
            values[f"train/{name}"] = float(v) / tokens if k.endswith("_sum") else float(v)
        rates = throughput.report()
        values.update({f"perf/{k}": v for k, v in rates.items()})
        writer.scalars(step, values)
        mfu = f"{rates['mfu']:.1%}" if "mfu" in rates else "n/a"
        bar.write(f"step {step:>6d}  loss {loss:.4f}  lr {values['train/lr']:.2e}  "
                  f"grad_norm {values['train/grad_norm']:.3f}  tokens/s {rates['tokens_per_sec']:,.0f}  MFU {mfu}",
                  file=sys.stderr)


_STOPS = ("raise", "stop", "debug_nans")
_STEP_KEYS = ("ce_sum", "z_sum", "tokens", "grad_norm", "lr", "param_norm", "nonfinite")
