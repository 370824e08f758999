"""The outer loop: data, sharded steps, checkpoints, metrics, evaluation, and clean exit on SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from kslm_jax.core import checkpoint, metrics, sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline, shards
from kslm_jax.eval import lm as evaluate
from kslm_jax.eval import runner
from kslm_jax.model import llama
from kslm_jax.train import health as health_lib
from kslm_jax.train import optim, preemption
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib

log = logging.getLogger("kslm")


class _Watchdog:
    """Ends the process with exit code 3 when no step completes for `timeout_s` seconds.

    A hung collective or a dead host otherwise blocks forever; exiting lets the cluster scheduler restart
    the job, which resumes from the newest checkpoint. Armed only after the first step, so compilation
    does not count.
    """

    EXIT_CODE = 3

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.step = None
        self.last = time.monotonic()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="kslm-watchdog").start()

    def beat(self, step: int) -> None:
        self.step, self.last = step, time.monotonic()

    def close(self) -> None:
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if self.step is not None and idle > self.timeout_s:
                log.error("watchdog: step %d stalled: no step finished for %.0fs (train.step_timeout_s=%g); "
                          "exiting with code %d so the scheduler can restart from the last checkpoint",
                          self.step + 1, idle, self.timeout_s, self.EXIT_CODE)
                logging.shutdown()
                os._exit(self.EXIT_CODE)


class Trainer:
    def __init__(self, cfg, workdir: str | Path):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.paths = workdir_lib.paths(self.workdir)
        self.check_data()
        self.mesh = sharding.make_mesh(cfg.mesh)
        self.rules = sharding.rules(cfg.mesh.rules)
        self.model_cfg = llama.ModelConfig.from_config(cfg)
        self.model = llama.Transformer(self.model_cfg)
        self.tx, self.lr_fn = optim.make(cfg.optim, cfg.train.steps)
        self.abstract, self.shardings = self.state_shapes()
        self.loss = self.build_loss()
        self.extra, self.extra_shardings = self.build_extra()
        self.train_step = self._jit_step()
        self.eval_step = step_lib.jit_eval_step(self.model, self.mesh, self.shardings.params, self.rules)
        self.state = None
        self.start_step = 0

    # Seams for other objectives (distillation, fine-tuning): a subclass overrides these, the loop stays one.
    def check_data(self) -> None:
        """Refuse missing or damaged token shards before anything is compiled."""
        cfg = self.cfg
        self.manifest = shards.read_manifest(self.paths["tokens"])
        if self.manifest["vocab_size"] != cfg.tokenizer.vocab_size:
            raise KslmError(f"token shards in {self.paths['tokens']} use a vocabulary of {self.manifest['vocab_size']} "
                            f"but tokenizer.vocab_size={cfg.tokenizer.vocab_size}; run `kslm tokenize` again")
        for split in ("train", "val"):
            shards.verify(self.paths["tokens"], split, cfg.data.verify_shards)

    def state_shapes(self):
        """(abstract TrainState, its shardings): what init_fresh builds and a checkpoint restores into."""
        return state_lib.abstract_and_shardings(self.model, self.tx, self.cfg.train.seed, self.mesh, self.rules)

    def build_loss(self):
        """`loss(params, extra, batch) -> (scalar, aux)`; see step.lm_loss for the contract."""
        return step_lib.lm_loss(self.model, self.cfg.train.z_loss, self.cfg.train.loss_chunk)

    def build_extra(self):
        """Arrays every step reads but never updates, placed on the mesh, and their shardings."""
        return None, None

    def train_iterator(self):
        """Host batches of numpy arrays; checkpoint.DataHandler must be able to save its state."""
        cfg = self.cfg
        return iter(pipeline.train_dataset(self.paths["tokens"], cfg.data, cfg.train.batch_size, cfg.train.grad_accum))

    def next_batch(self, data_iter) -> dict:
        """The next host batch; an objective may add arrays to it (a distillation cache's teacher outputs)."""
        return next(data_iter)

    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.data.seq_len

    def _jit_step(self, poison: bool = False):
        return step_lib.jit_train_step(self.loss, self.tx, self.lr_fn, self.cfg.train.grad_accum, self.mesh,
                                       self.shardings, self.extra_shardings, self.rules, poison=poison)

    def has_checkpoint(self) -> bool:
        return any(p.name.isdigit() for p in self.paths["checkpoints"].glob("*")) if self.paths["checkpoints"].is_dir() else False

    def init_fresh(self) -> None:
        self.state = state_lib.create(self.model, self.tx, self.cfg.train.seed, self.mesh, self.shardings, self.rules)
        self.start_step = 0

    def restore_or_init(self, mngr, data_iter) -> None:
        with jax.set_mesh(self.mesh):
            step, state = checkpoint.restore_latest(mngr, self.abstract, data_iter)
        if step is None:
            self.init_fresh()
        else:
            self.state, self.start_step = state, int(step)
            log.info("restored checkpoint step %d from %s", step, mngr.directory)

    def evaluate(self) -> dict:
        batches = pipeline.eval_batches(self.paths["tokens"], self.cfg.data, self.cfg.train.batch_size,
                                        self.cfg.train.eval_batches)
        with jax.set_mesh(self.mesh):
            total = evaluate.predicted_tokens(self.manifest["val"], self.cfg.train.eval_batches,
                                              self.cfg.train.batch_size, self.cfg.data.seq_len)
            nll, tokens = evaluate.run_lm_eval(self.eval_step, self.state.params, batches, self.mesh, total)
        return evaluate.summarize(nll, tokens, self.manifest["val"])

    def fit(self, on_eval=None) -> dict:
        """Train to cfg.train.steps from the newest checkpoint (or from scratch). Returns a summary."""
        try:
            return self._fit(on_eval)
        except Exception as e:  # noqa: BLE001 - only a full disk is translated; everything else re-raises
            if not _disk_full(e):
                raise
            done = sorted(int(p.name) for p in self.paths["checkpoints"].glob("*") if p.name.isdigit())
            raise KslmError(f"disk full while writing to {self.workdir}: checkpoints {done or 'none'} are intact "
                            "(a partial one is ignored); free space and run the same command to resume") from None

    def _fit(self, on_eval=None) -> dict:
        cfg = self.cfg
        tcfg = cfg.train
        data_iter = self.train_iterator()
        writer = metrics.Writer(self.workdir, cfg.logging.tensorboard)
        peak = metrics.device_peak_tflops(cfg.logging.peak_tflops)
        tokens_per_step = self.tokens_per_step()
        throughput = metrics.Throughput(llama.flops_per_token(self.model_cfg, cfg.data.seq_len),
                                        self.mesh.size, peak)
        summary = {"stopped_by": None, "losses": {}}
        self.health = health_lib.Health(tcfg.nonfinite, tcfg.spike_zscore)
        self._action = None
        self._restores = 0  # restores since the last checkpoint saved after one
        with checkpoint.manager(self.paths["checkpoints"], cfg.checkpoint) as mngr, preemption.StopSignal() as stop:
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
            # Fault injection for the tests: a real SIGTERM to ourselves after a step, or a step that hangs.
            fault_step = int(os.environ.get("KSLM_FAULT_SIGTERM_AT_STEP", "0"))
            stall_step = int(os.environ.get("KSLM_FAULT_STALL_AT_STEP", "0"))
            nan_step = int(os.environ.get("KSLM_FAULT_NAN_AT_STEP", "0"))
            watchdog = _Watchdog(tcfg.step_timeout_s)
            with jax.set_mesh(self.mesh):
                while step < tcfg.steps and not stop.check(step):
                    batch = sharding.global_batch(self.next_batch(data_iter), self.mesh, tcfg.grad_accum)
                    step_fn = self.train_step
                    if step + 1 == nan_step:  # once: a restored run passes this step again with good data
                        step_fn, nan_step = self._poisoned_step(), 0
                    self.state, out = step_fn(self.state, batch, self.extra)
                    step += 1
                    # Read the previous step's metrics only now, so the device never waits on the host.
                    if pending is not None:
                        self._log(pending, writer, throughput, bar, summary)
                    pending = (step, out)
                    if self._action == "raise":
                        break
                    if self._action == "restore":
                        step, pending = self._restore_last(mngr), None
                        continue
                    throughput.add(tokens_per_step)
                    # orbax's save policy decides the cadence; the final step is always saved
                    if checkpoint.save(mngr, step, self.state, data_iter, force=step == tcfg.steps):
                        last_saved, self._restores = step, 0
                    checkpoint.seal(mngr)
                    if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                        self._eval_and_log(writer, step, on_eval)
                    if step == fault_step:
                        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KSLM_FAULT_SIGNAL", "TERM")))
                    if step == stall_step:
                        time.sleep(10**6)
                    watchdog.beat(step)
                if pending is not None:
                    self._log(pending, writer, throughput, bar, summary, force=True)
                if (stop.received is not None or self._action == "raise") and last_saved != step:
                    checkpoint.save(mngr, step, self.state, data_iter, force=True)
                mngr.wait_until_finished()
                checkpoint.seal(mngr)
            watchdog.close()
            bar.close()
        summary["step"] = step
        summary.update(nonfinite=self.health.nonfinite, spikes=self.health.spikes)
        if self._action == "raise":
            writer.close()
            raise KslmError(f"non-finite loss or gradient (train.nonfinite=raise); the run stopped at step {step} "
                            "with its last good state saved; lower optim.lr or inspect the data, then resume")
        if stop.received is not None:
            summary["stopped_by"] = stop.received
            log.info("%s received: saved checkpoint at step %d; resume with the same command", stop.received, step)
        elif step >= tcfg.steps:
            summary["eval"] = self._eval_and_log(writer, step, on_eval)
        writer.close()
        return summary

    def _poisoned_step(self):
        return self._jit_step(poison=True)

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


_STEP_KEYS = ("ce_sum", "z_sum", "tokens", "grad_norm", "lr", "param_norm", "nonfinite")


def _disk_full(e: BaseException) -> bool:
    """Orbax reports ENOSPC from its writer threads as ValueError text; plain writes raise OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (28, 122):
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
