"""`kslm sweep`: hyperparameter search on Optuna; each trial is an ordinary `kslm train` run in WORKDIR/trials/NNN.

The parent never trains: it asks Optuna for a trial, writes the trial's config.json, starts `python -m kslm_jax
train` on it, follows its metrics.jsonl, reports held-out bits/char at each eval (train.eval_every) and stops the
process when the Hyperband pruner says so. Trials live in a database (SQLite WORKDIR/sweep.db, or --storage), so
a killed sweep resumes and several processes or hosts share one sweep:
- a trial whose parent died stops sending heartbeats; after 3 heartbeats (--heartbeat) any sweep process marks
  it failed and queues it again with the same parameters, in the same folder, where `kslm train` resumes from
  its newest checkpoint. The failed row stays in the database; it is never counted as a finished trial.
- --trials N counts finished (complete or pruned) trials across all processes. Two processes that ask at the
  same moment may overshoot by one: the later trial number sees N trials ahead of it and is closed as failed
  (user attribute `surplus`) before it trains.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from kslm_jax.cli import sweep_report
from kslm_jax.cli import sweep_space as space_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib

log = logging.getLogger("kslm")
STUDY = "kslm-sweep"
_PR_SET_PDEATHSIG = 1


def _optuna():
    try:
        import optuna
    except ImportError:
        raise KslmError("kslm sweep needs Optuna: pip install 'kslm_jax[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats and stale-trial retries are what make a killed sweep resumable; we drive them from ask/tell
    # ourselves (the trial is another process), which Optuna marks experimental and warns about on every call.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def _die_with_parent():
    """In the child before exec: a SIGKILLed sweep takes its trial with it instead of leaving it training."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _gpus() -> list[str]:
    """GPU indices for one-trial-per-device placement, read without initializing JAX in the parent."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if seen is not None:
        return [d for d in seen.split(",") if d.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


class Sweep:
    def __init__(self, args, cfg, params, storage: str):
        optuna = _optuna()
        self.optuna, self.args, self.cfg, self.params = optuna, args, cfg, params
        self.workdir = Path(args.workdir)
        self.fixed = {}
        if args.budget_steps:
            self.fixed["train.steps"] = args.budget_steps
        steps = args.budget_steps or cfg.train.steps
        self.eval_every = cfg.train.eval_every or max(1, steps // 4)
        self.fixed.update({"train.eval_every": self.eval_every, "logging.progress_bar": False})
        beat = max(1, int(args.heartbeat))
        # Optuna 4.9 renamed the stale-trial retry callback and its argument; older releases have the first pair.
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
            on_stale = {"heartbeat_stale_trial_callback": retry}
        else:
            retry = optuna.storages.RetryFailedTrialCallback(max_retry=2)
            on_stale = {"failed_trial_callback": retry}
        self.beat, self.retry = beat, retry
        pruner = optuna.pruners.NopPruner()
        if args.pruner == "hyperband":
            pruner = optuna.pruners.HyperbandPruner(min_resource=self.eval_every, max_resource=steps,
                                                    reduction_factor=3)
        # Processes started together race to create the tables and the study of a new database: the loser
        # sees "table exists", "UNIQUE constraint" or "database is locked" once, then finds them made.
        for attempt in range(6):
            try:
                rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=beat, grace_period=3 * beat,
                                                 **on_stale)
                self.study = optuna.create_study(storage=rdb, study_name=args.study, direction="minimize",
                                                 pruner=pruner, load_if_exists=True)
                break
            except Exception as e:  # noqa: BLE001 - sqlalchemy's errors; a real fault repeats and is raised
                if attempt == 5 or not any(w in str(e) for w in ("already exists", "UNIQUE", "locked")):
                    raise
                time.sleep(0.5 * (attempt + 1))
        record = {"space": [p.spec for p in params], "fixed": {k: str(v) for k, v in self.fixed.items()}}
        old = self.study.user_attrs.get("sweep")
        if old is None:
            self.study.set_user_attr("sweep", record)
        elif old != record:
            raise KslmError(f"study {args.study!r} in {storage} was started with {json.dumps(old)}; pass the same "
                            "--space/--budget-steps/--config.train.eval_every, or a new --study or --workdir")
        self.samplers = {"tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
                         "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
                         "qmc": lambda seed: optuna.samplers.QMCSampler(seed=args.seed or 0, scramble=True)}
        self.study.sampler = self.samplers[args.sampler](args.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error = None
        self.failures = 0

    def _states(self):
        return [t.state.name for t in self.study.get_trials(deepcopy=False)]

    def _finished(self) -> int:
        return sum(s in ("COMPLETE", "PRUNED") for s in self._states())

    def run(self, parallel: int) -> None:
        gpus = _gpus()
        workers = [threading.Thread(target=self._worker, args=(gpus[i % len(gpus)] if gpus else None,), daemon=True)
                   for i in range(parallel)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                time.sleep(0.2)
        except KeyboardInterrupt:
            # The running trials get SIGTERM, save a checkpoint and stay RUNNING in the study: the next
            # `kslm sweep` finds them stale and resumes them.
            self.stop.set()
            for w in workers:
                w.join()
            raise KslmError("interrupted: the running trials saved a checkpoint; run the same command to resume "
                            "the sweep") from None
        if self.error is not None:
            raise self.error

    def _worker(self, device):
        optuna = self.optuna
        while not self.stop.is_set():
            with self.lock:
                optuna.storages.fail_stale_trials(self.study)
                trials = self.study.get_trials(deepcopy=False)
                finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
                live = sum(t.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") for t in trials)
                if finished >= self.args.trials:
                    return
                if live >= self.args.trials and not any(t.state.name == "WAITING" for t in trials):
                    trial = None  # others are running the last trials; wait to see them finish or go stale
                else:
                    trial = self.study.ask()
                    self.study._storage.record_heartbeat(trial._trial_id)
            if trial is None:
                # The last trials may finish at any moment; sleeping a whole heartbeat (10 s by default) here
                # left every --parallel or shared sweep idle that long after its last trial before reporting.
                self.stop.wait(min(self.beat, 1))
                continue
            if self._surplus(trial):
                continue
            try:
                with self.lock:  # the study's sampler is shared by the worker threads
                    values = self._draw(trial)
                self._run_trial(trial, values, device)
            except BaseException as e:  # noqa: BLE001 - reported by run() in the main thread
                self.error = e if isinstance(e, KslmError) else KslmError(f"trial {trial.number:03d}: {e}")
                self.stop.set()
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                return

    def _surplus(self, trial) -> bool:
        ahead = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number
                 and t.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING")]
        if len(ahead) < self.args.trials:
            return False
        trial.set_user_attr("surplus", True)
        self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
        return True

    def _draw(self, trial) -> dict:
        """The trial's parameter values. With --seed, TPE and random draw from a generator seeded by the seed and
        the trial's number, which the storage hands out once per study: processes that share a study never draw
        alike (seeding each process with seed + trials so far gave two processes started together the same
        draws), and a trial's values do not depend on which process made it. QMC is indexed by trial already."""
        if self.args.seed is not None and self.args.sampler != "qmc":
            seed = int(np.random.SeedSequence([self.args.seed, trial.number]).generate_state(1)[0])
            self.study.sampler = self.samplers[self.args.sampler](seed)
        return {p.key: p.suggest(trial) for p in self.params}

    def _run_trial(self, trial, values, device):
        optuna = self.optuna
        frozen = self.study._storage.get_trial(trial._trial_id)
        origin = self.retry.retried_trial_number(frozen)
        folder = self.workdir / "trials" / f"{trial.number if origin is None else origin:03d}"
        trial.set_user_attr("workdir", str(folder))
        cfg = space_lib.trial_config(self.cfg, {**self.fixed, **values})
        space_lib.make_trial_dir(self.workdir, folder, cfg)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cmd = [sys.executable, "-m", "kslm_jax", "train", "--workdir", str(folder)]
        log.info("trial %03d (%s): %s", trial.number, folder,
                 " ".join(f"{k}={space_lib.override_text(v)}" for k, v in values.items()))
        with open(folder / "train.log", "a", encoding="utf-8") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        reader, reported, last, pruned, beat_at = space_lib.EvalReader(folder), set(), None, False, time.time()
        while True:
            rc = proc.poll()
            for step, value in reader.poll():
                last = (step, value)
                if step in reported:  # a resumed trial passes its last evals again
                    continue
                reported.add(step)
                trial.report(value, step)
                if trial.should_prune():
                    pruned = True
            if pruned or self.stop.is_set():
                _terminate(proc)
                break
            if rc is not None:
                break
            if time.time() - beat_at >= self.beat:
                self.study._storage.record_heartbeat(trial._trial_id)
                beat_at = time.time()
            time.sleep(0.3)
        state = optuna.trial.TrialState
        if pruned:
            self.study.tell(trial, state=state.PRUNED)
            log.info("trial %03d pruned at step %d (bits/char %.4f)", trial.number, last[0], last[1])
        elif proc.returncode == 0 and last is not None and last[0] >= cfg.train.steps:
            self.study.tell(trial, last[1])
            log.info("trial %03d complete: bits/char %.4f", trial.number, last[1])
        elif proc.returncode == 0:  # stopped by a signal from outside: left RUNNING, resumed once found stale
            log.warning("trial %03d stopped at its checkpoint before the budget; a later sweep resumes it",
                        trial.number)
        elif proc.returncode != 0 and not self.stop.is_set():
            self.study.tell(trial, state=state.FAIL)
            log.warning("trial %03d failed (exit code %s); see %s", trial.number, proc.returncode,
                        folder / "train.log")
            with self.lock:
                self.failures += 1
                if self.failures >= 3:  # a config that cannot train would otherwise draw trials forever
                    self.error = KslmError(f"3 trials in a row failed; the last log is {folder / 'train.log'}")
                    self.stop.set()
            return
        with self.lock:
            self.failures = 0


def _terminate(proc) -> None:
    """SIGTERM first: `kslm train` saves a checkpoint and exits 0, leaving a folder that can be resumed."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _transfer(args, cfg, best: dict) -> dict:
    """Train the full width with the proxy's best values, in WORKDIR/transfer, and read its held-out bits/char."""
    key, _, raw = args.transfer.partition("=")
    space_lib.check_key(cfg, key, raw, f"--transfer {args.transfer!r}")
    folder = Path(args.workdir) / "transfer"
    overrides = {**best["params"], "logging.progress_bar": False, key: raw}
    if args.budget_steps:
        overrides["train.steps"] = args.budget_steps
    full = space_lib.trial_config(cfg, overrides)
    space_lib.make_trial_dir(Path(args.workdir), folder, full)
    log.info("transfer: training %s=%s with %s in %s", key, raw, best["params"], folder)
    with open(folder / "train.log", "a", encoding="utf-8") as out:
        rc = subprocess.run([sys.executable, "-m", "kslm_jax", "train", "--workdir", str(folder)], stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, check=False).returncode
    evals = space_lib.EvalReader(folder).poll()
    if rc != 0 or not evals:
        raise KslmError(f"transfer run failed (exit code {rc}); see {folder / 'train.log'}")
    return {"key": key, "value": raw, "params": best["params"], "workdir": str(folder),
            "step": evals[-1][0], "bits_per_char": evals[-1][1]}


def cli(args, overrides) -> int:
    """The `kslm sweep` command: the config of args.workdir (or --config), bound to it like any command's."""
    cfg = workdir_lib.config_for(args.workdir, args.config, overrides, getattr(args, "force", False))
    workdir = Path(args.workdir)
    params = space_lib.parse_all(cfg, args.space)
    if not params:
        raise KslmError("kslm sweep needs at least one --space, e.g. --space 'optim.lr=loguniform(1e-4,3e-3)'")
    if args.trials < 1 or args.parallel < 1:
        raise KslmError("--trials and --parallel must be at least 1")
    if args.transfer and "=" not in args.transfer:
        raise KslmError(f"--transfer {args.transfer!r}: expected KEY=VALUE, e.g. model.d_model=256")
    if not (workdir_lib.paths(workdir)["tokens"] / "manifest.json").is_file():
        raise KslmError(f"{workdir} has no token shards: run `kslm prepare`, `kslm tokenizer` and `kslm tokenize` "
                        "there first; the trials share them")
    tok_lib.check_workdir(cfg, workdir)
    storage = args.storage or f"sqlite:///{(workdir / 'sweep.db').resolve()}"
    sweep = Sweep(args, cfg, params, storage)
    before = sweep._finished()
    if before:
        log.info("resuming: %d of %d trials already finished in %s", before, args.trials, storage)
    sweep.run(args.parallel)
    study = sweep.study
    print(space_lib.format_table(study.get_trials(deepcopy=False), params))
    best = sweep_report.best_record(study, params, storage)
    if best is None:
        raise KslmError(f"no trial completed; see the train.log files under {workdir / 'trials'}")
    if args.transfer:
        best["transfer"] = _transfer(args, cfg, best)
        print(f"transfer {args.transfer}: bits/char {best['transfer']['bits_per_char']:.4f} at step "
              f"{best['transfer']['step']} with {best['params']} (proxy best {best['bits_per_char']:.4f})")
    print(f"best: trial {best['trial']:03d} bits/char {best['bits_per_char']:.4f} {best['params']} -> "
          f"{sweep_report.write_best(workdir, best)}")
    print(f"TensorBoard HParams -> {sweep_report.write_hparams(workdir, study, params)}")
    print(sweep_report.write_importance(workdir, study, params))
    return 0
