"""What a finished `kslm sweep` leaves: best.json, a TensorBoard HParams run per trial, an Optuna importance plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from kslm_jax.cli import sweep_space as space_lib
from kslm_jax.core import workdir as workdir_lib

log = logging.getLogger("kslm")
MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer completed trials ranks noise


def best_record(study, params, storage: str) -> dict | None:
    order = space_lib.ranked(study.get_trials(deepcopy=False))
    if not order or order[0].state.name != "COMPLETE":
        return None
    t = order[0]
    return {"trial": t.number, "bits_per_char": t.value, "params": {p.key: t.params[p.key] for p in params},
            "workdir": t.user_attrs.get("workdir"), "step": max(t.intermediate_values, default=None),
            "finished_trials": len(order), "study": study.study_name, "storage": storage}


def write_best(workdir: Path, record: dict) -> Path:
    path = workdir / "best.json"
    workdir_lib.atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def write_hparams(workdir: Path, study, params) -> Path:
    """One HParams session per finished trial under WORKDIR/tensorboard_sweep; rewritten whole each time, so a
    resumed or shared sweep never shows a trial twice."""
    from tensorboardX import SummaryWriter

    out = workdir / "tensorboard_sweep"
    try:
        with workdir_lib.atomic_dir(out) as tmp:
            writer = SummaryWriter(logdir=str(tmp))
            for t in space_lib.ranked(study.get_trials(deepcopy=False)):
                hp = {p.key: t.params[p.key] for p in params}
                hp["state"] = t.state.name.lower()
                metrics = {"hparam/bits_per_char": float(t.value),
                           "hparam/step": float(max(t.intermediate_values, default=0))}
                writer.add_hparams(hp, metrics, name=f"trial_{t.number:03d}")
            writer.close()
    except OSError:  # another sweep process of the same study replaced it at the same moment: same content
        if not out.is_dir():
            raise
    return out


def write_importance(workdir: Path, study, params) -> str:
    """optuna's fANOVA importances as a PNG beside best.json; a line saying why when they would mean nothing."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(params) < 2:
        return "importance plot skipped: it needs at least 2 swept parameters"
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return (f"importance plot skipped: {len(complete)} completed trials, it needs "
                f"{MIN_TRIALS_FOR_IMPORTANCE}")
    import matplotlib
    matplotlib.use("Agg")  # no display on a training host
    import matplotlib.pyplot as plt
    import optuna

    ax = optuna.visualization.matplotlib.plot_param_importances(study)
    path = workdir / "importance.png"
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
    return f"importance plot -> {path}"
