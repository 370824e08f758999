"""`kslm sweep` bookkeeping: the --space mini-syntax, trial workdirs that share the sweep's prepared data, and the
eval results a running trial writes to its metrics.jsonl."""
from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError

KINDS = ("loguniform", "uniform", "int", "choice")
METRIC = "eval/bits_per_char"
_SPEC = re.compile(r"^\s*([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)\s*=\s*([a-z]+)\((.*)\)\s*$")
_WORD = re.compile(r"^[A-Za-z_][\w.+-]*$")


@dataclass(frozen=True)
class Param:
    key: str      # a config key, e.g. optim.lr
    kind: str     # one of KINDS
    values: tuple  # (low, high) for the ranges, the literal options for choice
    spec: str     # the --space text, for error lines and the study's record

    def suggest(self, trial):
        """Ask an Optuna trial for this parameter's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")


def _literal(raw: str, spec: str):
    """One literal: a number, a quoted string, true/false, or a bare word read as a string; never code."""
    raw = raw.strip()
    if not raw:
        raise KslmError(f"--space {spec!r}: an empty value; write e.g. choice(16,32,64)")
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if _WORD.match(raw):
            return raw
        raise KslmError(f"--space {spec!r}: cannot read {raw!r} as a number or a string") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise KslmError(f"--space {spec!r}: {raw!r} is not a number or a string")
    return value


def parse(spec: str) -> Param:
    """`optim.lr=loguniform(1e-4,3e-3)`, `uniform(a,b)`, `int(a,b)` or `choice(v1,v2,...)`; anything else is refused."""
    m = _SPEC.match(spec)
    if not m:
        raise KslmError(f"--space {spec!r}: expected KEY=KIND(ARGS) with KIND one of {', '.join(KINDS)}, "
                        "e.g. optim.lr=loguniform(1e-4,3e-3)")
    key, kind, inner = m.groups()
    if kind not in KINDS:
        raise KslmError(f"--space {spec!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    values = tuple(_literal(v, spec) for v in inner.split(","))
    if kind == "choice":
        if len(set(values)) != len(values):
            raise KslmError(f"--space {spec!r}: a value is listed twice")
        return Param(key, kind, values, spec)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise KslmError(f"--space {spec!r}: {kind} takes two finite numbers, low and high")
    low, high = values
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise KslmError(f"--space {spec!r}: int takes two integers")
    if not low < high:
        raise KslmError(f"--space {spec!r}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise KslmError(f"--space {spec!r}: loguniform needs a positive low bound")
    return Param(key, kind, (low, high) if kind == "int" else (float(low), float(high)), spec)


def check_key(cfg, key: str, sample, what: str) -> None:
    """Refuse a key that does not exist, cannot take `sample`, or would change the shared prepared data."""
    if any(key.startswith(d) for d in config_lib.DATA_DEFINING):
        raise KslmError(f"{what}: {key} defines the prepared data the trials share; sweep it with one "
                        "workdir per value (prepare, tokenizer, tokenize), not in --space")
    try:
        config_lib.apply_override(copy.deepcopy(cfg), f"{key}={override_text(sample)}")
    except KslmError as e:
        raise KslmError(f"{what}: {e}") from None


def parse_all(cfg, specs: list[str]) -> list[Param]:
    params = [parse(s) for s in specs]
    seen = set()
    for p in params:
        if p.key in seen:
            raise KslmError(f"--space {p.spec!r}: {p.key} is given twice")
        seen.add(p.key)
        for v in p.values:
            check_key(cfg, p.key, v, f"--space {p.spec!r}")
    return params


def override_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def trial_config(base, overrides: dict):
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        config_lib.apply_override(cfg, f"{key}={override_text(value)}")
    config_lib.validate(cfg)
    return cfg


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_trial_dir(sweep_dir: Path, trial_dir: Path, cfg) -> None:
    """A workdir that trains, evals, generates and exports like any other: its own config.json and tokenizer,
    the sweep's token shards as hard links (copies where links are not allowed). Idempotent: a retried trial
    finds its folder (and its checkpoints) as it was left."""
    src = workdir_lib.paths(sweep_dir)
    dst = workdir_lib.paths(trial_dir)
    if not dst["tokenizer"].is_file():
        dst["tokenizer"].parent.mkdir(parents=True, exist_ok=True)
        for f in src["tokenizer"].parent.iterdir():
            if f.is_file():
                shutil.copy2(f, dst["tokenizer"].parent / f.name)
    if not (dst["tokens"] / "manifest.json").is_file():
        partial = dst["tokens"].with_name(".tokens.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src["tokens"], partial, copy_function=_link_or_copy)
        partial.rename(dst["tokens"])
    workdir_lib.bind(trial_dir, cfg)


class EvalReader:
    """Follows a trial's metrics.jsonl: the held-out bits/char of each eval, read as the trainer flushes them."""

    def __init__(self, workdir: Path):
        self.path = workdir_lib.paths(workdir)["metrics"]
        self.offset = 0
        self.buffer = ""

    def poll(self) -> list[tuple[int, float]]:
        """New (step, bits/char) pairs since the last call; a line still being written waits for the next call."""
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split("\n")
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and METRIC in rec and math.isfinite(rec[METRIC]):
                out.append((int(rec["step"]), float(rec[METRIC])))
        return out


def ranked(trials) -> list:
    """Finished trials, best first: completed ones by final bits/char, then pruned ones by their last report."""
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.value is not None]
    return sorted(done, key=lambda t: (t.state.name != "COMPLETE", t.value))


def format_table(trials, params: list[Param]) -> str:
    keys = [p.key for p in params]
    head = ["rank", "trial", "state", "bits/char", "step"] + keys
    rows = []
    for i, t in enumerate(ranked(trials), 1):
        step = max(t.intermediate_values) if t.intermediate_values else ""
        rows.append([str(i), f"{t.number:03d}", t.state.name.lower(), f"{t.value:.4f}", str(step)]
                    + [_short(t.params.get(k)) for k in keys])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head] + rows)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
