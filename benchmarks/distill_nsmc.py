"""Does distillation pay on Korean? A teacher and three students of one shape on NSMC movie reviews.

    python benchmarks/distill_nsmc.py                # one GPU: the measurement (recipes sized for ~9 minutes)
    python benchmarks/distill_nsmc.py --smoke        # CPU, tiny models on 20k reviews: the same stages

Every stage is the `kslm` command a user would type (printed before it runs):
1. prepare (held-out split by movie_id: no movie on both sides), tokenizer, tokenize, in the teacher's workdir;
2. train the teacher (configs/distill_nsmc_teacher.py, ~100M);
3. the student (configs/distill_nsmc.py, ~22M) three ways at the same token budget: from scratch, distilled
   online from the teacher, and pruned from the teacher (`kslm prune` to the student's shape: depth by block
   influence, width by activation importance) then distilled;
4. a table of held-out loss, perplexity and bits per character (from each run's eval/lm.json), printed and
   written to $OUT/distill_nsmc.md and .json when OUT is set.
Students share the teacher's tokenizer and token shards (hard links), so their numbers are comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from stages import REPO, device_name, find_data, flags, fresh, link_tree, run, subset, write_out

# Tiny shapes for --smoke (CPU): the same stages, the same ratios (student = half width, half depth).
SMOKE_COMMON = ["tokenizer.vocab_size=2000", "data.seq_len=128", "train.batch_size=16", "model.dtype=float32",
                "model.attention=xla", "model.scan_layers=true", "data.workers=0", "train.log_every=20",
                "train.eval_every=0", "logging.progress_bar=false"]
SMOKE_TEACHER = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=384",
                 "optim.warmup_steps=10"]
SMOKE_STUDENT = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192",
                 "optim.warmup_steps=10"]


def share_data(teacher: Path, student: Path) -> None:
    """The student reads the teacher's tokenizer and token shards (hard links, copies across devices)."""
    link_tree(teacher / "tokenizer", student / "tokenizer")
    link_tree(teacher / "data" / "tokens", student / "data" / "tokens")


def student_overrides(teacher_recipe: str, student_recipe: str, smoke: bool) -> list[str]:
    """The student recipe's training keys that differ from the teacher's, for `kslm prune` to apply."""
    from kslm_jax.core import config as config_lib
    t = config_lib.flat(config_lib.to_dict(config_lib.load(teacher_recipe)))
    s = config_lib.flat(config_lib.to_dict(config_lib.load(student_recipe)))
    keys = [k for k in s if k.split(".")[0] in ("optim", "train", "checkpoint", "distill") and s[k] != t[k]]
    out = [f"{k}={s[k]}" for k in keys if k != "distill.teacher"]
    return out + (["optim.warmup_steps=10"] if smoke else [])


def read_eval(wd: Path) -> dict:
    return json.loads((wd / "eval" / "lm.json").read_text())


def param_count(cfg) -> int:
    """Parameters from the config alone: this process never starts JAX, so the GPU stays with the stages."""
    from kslm_jax.core import config as config_lib
    m, v = cfg.model, config_lib.padded_vocab(cfg)
    d, h, ff = m.d_model, config_lib.head_dim(cfg), config_lib.d_ff(cfg)
    layer = d * h * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * d * ff + 2 * d
    return v * d * (1 if m.tie_embeddings else 2) + m.n_layers * layer + d


class Report:
    """The table so far, printed at the end and rewritten under $OUT after every stage (a run cut short
    still leaves what it measured)."""

    LABELS = (("teacher", "teacher"), ("scratch", "student, from scratch"), ("distilled", "student, distilled"),
              ("pruned_before", "student, pruned (before training)"), ("pruned", "student, pruned + distilled"))

    def __init__(self, wd: dict, title: str, common: list[str]):
        self.wd, self.title, self.shared = wd, title, " ".join(flags(common))
        self.log, self.rows, self.t0, self.done = [], {}, time.perf_counter(), False

    def stage(self, cmd: list[str]) -> None:
        run(cmd, self.log)
        self.write()

    def collect(self, name: str, result: dict | None = None) -> None:
        from kslm_jax.core import config as config_lib
        folder = self.wd["pruned" if name == "pruned_before" else name]
        cfg = config_lib.read_workdir_config(folder)
        steps = 0 if name == "pruned_before" else cfg.train.steps
        self.rows[name] = dict(result or read_eval(folder)["model"], params=param_count(cfg), steps=steps,
                               tokens=steps * cfg.train.batch_size * cfg.data.seq_len,
                               distill=cfg.distill.to_dict() if cfg.distill.teacher and steps else None)
        self.write()

    def text(self) -> str:
        table = ["| model | params | steps | train tokens | held-out loss | ppl | bits/char |",
                 "|---|---|---|---|---|---|---|"]
        for name, label in self.LABELS:
            if name in self.rows:
                r = self.rows[name]
                table.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['steps']} | {r['tokens'] / 1e6:.1f}M "
                             f"| {r['loss']:.4f} | {r['perplexity']:.2f} | {r['bits_per_char']:.4f} |")
        stages = [f"- {e['seconds']:>6.1f}s  {e['command'].replace(self.shared, '$COMMON')}" for e in self.log]
        when = "in all" if self.done else "so far"
        return (f"{self.title}; {time.perf_counter() - self.t0:.0f}s {when}\n\n" + "\n".join(table)
                + f"\n\nstage times (COMMON={self.shared}):\n" + "\n".join(stages) + "\n")

    def write(self) -> None:
        write_out("distill_nsmc", self.text(), {"title": self.title, "rows": self.rows, "stages": self.log,
                                                "seconds": time.perf_counter() - self.t0})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models on a 20k-review subset, for a CPU")
    p.add_argument("--data", default=None, help="nsmc_reviews.jsonl.gz (default: .devdata/ or ../shared/data/ko/)")
    p.add_argument("--runs", default=str(REPO / "runs" / "distill_nsmc"), help="folder for the workdirs (replaced)")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: the teacher recipe's (smoke: 150)")
    p.add_argument("--student-steps", type=int, default=None, help="default: the student recipe's (smoke: 100)")
    p.add_argument("--split-field", default="movie_id", help="held-out split by this field ('' = by text hash)")
    p.add_argument("--smoke-rows", type=int, default=20_000)
    args = p.parse_args()

    data = find_data("nsmc_reviews.jsonl.gz", args.data)
    runs = fresh(args.runs)
    os.chdir(REPO)  # the recipes below are named relative to the checkout
    if args.smoke:
        data = subset(data, runs / "nsmc_subset.jsonl.gz", args.smoke_rows)
    t_recipe, s_recipe = "configs/distill_nsmc_teacher.py", "configs/distill_nsmc.py"
    common = [f"data.sources={data}", f"data.split_field={args.split_field}"] + (SMOKE_COMMON if args.smoke else [])
    teacher_cfg = common + (SMOKE_TEACHER if args.smoke else [])
    student_cfg = common + (SMOKE_STUDENT if args.smoke else [])
    t_steps = args.teacher_steps or (150 if args.smoke else None)
    s_steps = args.student_steps or (100 if args.smoke else None)
    if t_steps:
        teacher_cfg += [f"train.steps={t_steps}", f"checkpoint.every_steps={t_steps}"]
    if s_steps:
        student_cfg += [f"train.steps={s_steps}", f"checkpoint.every_steps={s_steps}"]
    wd = {name: runs / name for name in ("teacher", "scratch", "distilled", "pruned")}
    title = (f"distill_nsmc{' --smoke' if args.smoke else ''} on {device_name()}, data {data.name}, "
             f"held out by {args.split_field or 'text hash'}")
    rep = Report(wd, title, common)

    for stage in ("prepare", "tokenizer", "tokenize"):
        rep.stage([stage, "--config", t_recipe, "--workdir", str(wd["teacher"]), *flags(teacher_cfg)])
    rep.stage(["train", "--workdir", str(wd["teacher"])])
    rep.collect("teacher")

    for name, extra in (("scratch", ["distill.teacher="]), ("distilled", [f"distill.teacher={wd['teacher']}"])):
        share_data(wd["teacher"], wd[name])
        rep.stage(["train", "--config", s_recipe, "--workdir", str(wd[name]), *flags(student_cfg + extra)])
        rep.collect(name)

    from kslm_jax.core import config as config_lib
    s = config_lib.load(s_recipe, student_cfg)
    shape = ["--n-layers", str(s.model.n_layers), "--d-model", str(s.model.d_model), "--d-ff", str(s.model.d_ff),
             "--n-heads", str(s.model.n_heads), "--n-kv-heads", str(s.model.n_kv_heads)]
    keep = student_overrides(t_recipe, s_recipe, args.smoke)
    keep += [f"train.steps={s.train.steps}", f"checkpoint.every_steps={s.checkpoint.every_steps}",
             f"distill.teacher={wd['teacher']}"]
    rep.stage(["prune", "--teacher", str(wd["teacher"]), "--workdir", str(wd["pruned"]), *shape, *flags(keep)])
    rep.stage(["eval", "--workdir", str(wd["pruned"])])
    rep.collect("pruned_before")
    rep.stage(["train", "--workdir", str(wd["pruned"])])
    rep.done = True
    rep.collect("pruned")

    print("\n" + rep.text())
    scratch = rep.rows["scratch"]["bits_per_char"]
    for name in ("distilled", "pruned"):
        bpc = rep.rows[name]["bits_per_char"]
        label = dict(Report.LABELS)[name]
        print(f"{label} {'beats' if bpc < scratch else 'does NOT beat'} the student from scratch: "
              f"{bpc:.4f} vs {scratch:.4f} bits/char")
    return 0


if __name__ == "__main__":
    sys.exit(main())
