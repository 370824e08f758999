"""What `kslm train` reports around the trainer's own step logging: held-out bits per character before training,
generated samples and the unigram baseline in TensorBoard at every evaluation, and at the end the HParams entry
and the before / after / unigram table the demo prints.

It only reads the trainer (`evaluate`, `has_checkpoint`, `init_fresh`, `model`, `state.params`), so any trainer
that `kslm train` builds can be reported on.
"""
from __future__ import annotations

import jax

from kslm_jax.core import config as config_lib
from kslm_jax.core import metrics
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.eval import generate
from kslm_jax.eval import lm

SAMPLE_PROMPTS = 2


class TrainReport:
    def __init__(self, cfg, workdir, trainer, on_eval=None):
        self.cfg, self.trainer, self.print_eval = cfg, trainer, on_eval
        p = workdir_lib.paths(workdir)
        self.unigram = lm.unigram_baseline(p["tokens"], cfg.tokenizer.vocab_size)
        try:
            self.prompts = generate.held_out_prompts(p["clean"], SAMPLE_PROMPTS)
        except KslmError:  # an imported or pruned workdir may have no clean text: no samples then
            self.prompts = []
        self.sp = tok_lib.load(p["tokenizer"])
        self.before = None
        tb = cfg.logging.tensorboard
        self.samples = metrics.Board(workdir, "samples", tb)
        self.baseline = metrics.Board(workdir, "unigram", tb)
        self.final = metrics.Board(workdir, "hparams", tb)

    def measure_before(self) -> dict | None:
        """Held-out numbers of the initial weights for a run that starts from scratch; None when resuming."""
        if self.trainer.has_checkpoint():
            return None
        self.trainer.init_fresh()
        self.before = self.trainer.evaluate()
        self.baseline.scalars(0, {"eval/bits_per_char": self.unigram["bits_per_char"]})
        return self.before

    def on_eval(self, step: int, result: dict, seconds: float) -> None:
        """For Trainer.fit(on_eval=...): the unigram line at this step and samples of the current weights."""
        if self.print_eval:
            self.print_eval(step, result, seconds)
        self.baseline.scalars(step, {"eval/bits_per_char": self.unigram["bits_per_char"],
                                     "eval/bits_per_byte": self.unigram["bits_per_byte"]})
        if self.prompts:
            self.samples.text("samples", self.sample_markdown(), step)

    def sample_markdown(self) -> str:
        # One seed at every evaluation: the samples differ only because the weights do.
        rng = jax.random.PRNGKey(self.cfg.generate.seed)
        lines = []
        for prompt in self.prompts:
            rng, key = jax.random.split(rng)
            text = generate.generate_text(self.trainer.model, self.trainer.state.params, self.sp, prompt,
                                          self.cfg.generate, key)
            lines.append(f"- **{prompt}**{text[len(prompt):] if text.startswith(prompt) else ' → ' + text}")
        return "\n".join(lines)

    def finish(self, summary: dict) -> str:
        """The HParams entry (every config key; final held-out bits per character as the metric) and the table."""
        after, step = summary["eval"], summary["step"]
        self.final.hparams(config_lib.flat(config_lib.to_dict(self.cfg)),
                           {"hparam/bits_per_char": after["bits_per_char"], "hparam/loss": after["loss"]}, step)
        rows = {}
        if self.before is not None:
            rows["before training"] = self.before
        rows[f"after training (step {step})"] = after
        rows["unigram (train split)"] = self.unigram
        verdict = "beats" if after["bits_per_char"] < self.unigram["bits_per_char"] else "does NOT beat"
        return (lm.format_table(rows) + f"\nthe trained model {verdict} the unigram model: "
                f"{after['bits_per_char']:.3f} vs {self.unigram['bits_per_char']:.3f} bits per character")

    def close(self) -> None:
        for board in (self.samples, self.baseline, self.final):
            board.close()
