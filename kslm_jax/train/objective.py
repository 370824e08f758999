"""What one training loop is handed: the Setup every run shares and the Objective that says what is learned.

Pretraining, SFT, classification (full or LoRA) and distillation are Objectives (kslm_jax/objectives/); the
loop (train/loop.py) runs any of them with the same checkpoints, resume, signals, health checks and logging.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import optax

from kslm_jax.core import sharding
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.model import arch, llama
from kslm_jax.train import optim
from kslm_jax.train import state as state_lib


@dataclasses.dataclass
class Setup:
    """The config, the workdir, the mesh, the model and the optimizer: built once, read by the objective and
    the loop alike."""
    cfg: Any
    workdir: Path
    paths: dict
    mesh: Any
    rules: tuple
    model_cfg: llama.ModelConfig        # or recurrent.RecurrentConfig (model.arch=gru|lstm)
    model: llama.Transformer            # or recurrent.RecurrentLM, called the same way
    tx: optax.GradientTransformation
    lr_fn: optax.Schedule

    @classmethod
    def of(cls, cfg, workdir) -> "Setup":
        workdir = Path(workdir)
        model_cfg, model = arch.from_config(cfg)
        tx, lr_fn = optim.make(cfg.optim, cfg.train.steps)
        return cls(cfg, workdir, workdir_lib.paths(workdir), sharding.make_mesh(cfg.mesh),
                   sharding.rules(cfg.mesh.rules), model_cfg, model, tx, lr_fn)

    def has_checkpoint(self) -> bool:
        ck = self.paths["checkpoints"]
        return any(p.name.isdigit() for p in ck.glob("*")) if ck.is_dir() else False


class Objective(Protocol):
    """What is learned, from which data, and how it is judged.

    `loss(params, extra, batch, rng) -> (total, aux)`: `total` is the *sum* of the per-token (or per-example)
    losses of the batch and aux["tokens"] the count they are summed over; aux holds at least ce_sum, z_sum
    and tokens, and the loop logs any other key, divided by tokens when it ends in _sum. The step divides the
    summed gradient of all micro-batches by the total count, so accumulation gives the gradient of one big
    batch. `rng` is this micro-batch's key, derived from (seed, step, micro-batch index) by the step.
    `extra` holds arrays the step reads but never updates (a teacher, a frozen LoRA base), placed on the mesh
    with `extra_shardings`.
    """
    setup: Setup
    abstract: state_lib.TrainState      # the state's shapes, what a checkpoint restores into
    shardings: state_lib.TrainState     # and their NamedShardings
    loss: Callable
    extra: Any
    extra_shardings: Any
    tokens_per_step: int                # for throughput: positions one step reads
    word_ids: Any                       # label-word ids of a classifier scored by the LM head, else None

    def init_state(self) -> state_lib.TrainState:
        """A fresh state (a fine-tuning base already loaded into it), placed in `shardings`."""

    def batches(self) -> Iterator[dict]:
        """Host batches of numpy arrays; checkpoint.DataHandler must be able to save the iterator's state."""

    def attach(self, batch: dict) -> dict:
        """The host batch as the step takes it: this process's rows, a cache's teacher outputs, ..."""

    def evaluate(self, state: state_lib.TrainState) -> dict:
        """Held-out metrics of `state`, called on the training schedule and at the end."""

    def lm_params(self, state: state_lib.TrainState):
        """Plain decoder parameters of `state` (LoRA adapters merged): what task evaluation and export read."""

    def head(self, state: state_lib.TrainState):
        """A linear classifier head of `state`, or None."""
