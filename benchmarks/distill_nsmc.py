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
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_CANDIDATES = (REPO / ".devdata" / "nsmc_reviews.jsonl.gz", REPO.parent / "shared" / "data" / "ko" / "nsmc_reviews.jsonl.gz")

# Tiny shapes for --smoke (CPU): the same stages, the same ratios (student = half width, half depth).
SMOKE_COMMON = ["tokenizer.vocab_size=2000", "data.seq_len=128", "train.batch_size=16", "model.dtype=float32",
                "model.attention=xla", "model.scan_layers=true", "data.workers=0", "train.log_every=20",
                "train.eval_every=0", "logging.progress_bar=false"]
SMOKE_TEACHER = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=384",
                 "optim.warmup_steps=10"]
SMOKE_STUDENT = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=192",
                 "optim.warmup_steps=10"]


def run(cmd: list[str], log: list) -> float:
    """Run one kslm command, streaming its output; returns its wall time."""
    shown = " ".join(cmd)
    print(f"\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kslm_jax", *cmd], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - t0
    log.append({"command": "kslm " + shown, "seconds": round(seconds, 1)})
    print(f"  ({seconds:.0f}s)", flush=True)
    return seconds


def flags(overrides: list[str]) -> list[str]:
    return [f"--config.{o}" for o in overrides]


def subset(src: Path, dst: Path, rows: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt", encoding="utf-8") as fin, gzip.open(dst, "wt", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= rows:
                break
            fout.write(line)
    return dst


def share_data(teacher: Path, student: Path) -> None:
    """The student reads the teacher's tokenizer and token shards (hard links, copies across devices)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(teacher / "tokenizer", student / "tokenizer", copy_function=link)
    shutil.copytree(teacher / "data" / "tokens", student / "data" / "tokens", copy_function=link)


def student_overrides(teacher_recipe: str, student_recipe: str, smoke: bool) -> list[str]:
    """The student recipe's training keys that differ from the teacher's, for `kslm prune` to apply."""
    from kslm_jax import config as config_lib
    t = config_lib.flat(config_lib.to_dict(config_lib.load(teacher_recipe)))
    s = config_lib.flat(config_lib.to_dict(config_lib.load(student_recipe)))
    keys = [k for k in s if k.split(".")[0] in ("optim", "train", "checkpoint", "distill") and s[k] != t[k]]
    out = [f"{k}={s[k]}" for k in keys if k != "distill.teacher"]
    return out + (["optim.warmup_steps=10"] if smoke else [])


def read_eval(wd: Path) -> dict:
    return json.loads((wd / "eval" / "lm.json").read_text())


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

    data = Path(args.data) if args.data else next((d for d in DATA_CANDIDATES if d.is_file()), None)
    if data is None or not data.is_file():
        sys.exit(f"NSMC reviews not found (tried {args.data or ', '.join(map(str, DATA_CANDIDATES))}); pass --data")
    runs = Path(args.runs).absolute()
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
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
    log: list = []
    t0 = time.perf_counter()
    wd = {name: runs / name for name in ("teacher", "scratch", "distilled", "pruned")}

    for stage in ("prepare", "tokenizer", "tokenize"):
        run([stage, "--config", t_recipe, "--workdir", str(wd["teacher"]), *flags(teacher_cfg)], log)
    run(["train", "--workdir", str(wd["teacher"])], log)

    for name, extra in (("scratch", ["distill.teacher="]), ("distilled", [f"distill.teacher={wd['teacher']}"])):
        share_data(wd["teacher"], wd[name])
        run(["train", "--config", s_recipe, "--workdir", str(wd[name]), *flags(student_cfg + extra)], log)

    from kslm_jax import config as config_lib
    s = config_lib.load(s_recipe, student_cfg)
    shape = ["--n-layers", str(s.model.n_layers), "--d-model", str(s.model.d_model), "--d-ff", str(s.model.d_ff),
             "--n-heads", str(s.model.n_heads), "--n-kv-heads", str(s.model.n_kv_heads)]
    keep = student_overrides(t_recipe, s_recipe, args.smoke)
    keep += [f"train.steps={s.train.steps}", f"checkpoint.every_steps={s.checkpoint.every_steps}",
             f"distill.teacher={wd['teacher']}"]
    run(["prune", "--teacher", str(wd["teacher"]), "--workdir", str(wd["pruned"]), *shape, *flags(keep)], log)
    run(["eval", "--workdir", str(wd["pruned"])], log)
    pruned_before = read_eval(wd["pruned"])["model"]
    run(["train", "--workdir", str(wd["pruned"])], log)

    rows = {}
    for name, label in (("teacher", "teacher"), ("scratch", "student, from scratch"),
                        ("distilled", "student, distilled"), ("pruned", "student, pruned + distilled")):
        cfg = config_lib.read_workdir_config(wd[name])
        from kslm_jax.model import llama
        import jax
        import jax.numpy as jnp
        model = llama.Transformer(llama.ModelConfig.from_config(cfg))
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
        n = sum(x.size for x in jax.tree.leaves(params))
        r = read_eval(wd[name])["model"]
        rows[label] = dict(r, params=n, steps=cfg.train.steps, tokens=cfg.train.steps * cfg.train.batch_size
                           * cfg.data.seq_len, distill=cfg.distill.to_dict() if cfg.distill.teacher else None)
        if name == "pruned":
            rows["student, pruned (before training)"] = dict(pruned_before, params=n, steps=0, tokens=0, distill=None)
    table = ["| model | params | steps | train tokens | held-out loss | ppl | bits/char |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        table.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['steps']} | {r['tokens'] / 1e6:.1f}M | {r['loss']:.4f} "
                     f"| {r['perplexity']:.2f} | {r['bits_per_char']:.4f} |")
    total = time.perf_counter() - t0
    import jax
    device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    shared = " ".join(flags(common))  # every data-stage command carries these; shown once
    stages = [f"- {e['seconds']:>6.1f}s  {e['command'].replace(shared, '$COMMON')}" for e in log]
    text = (f"distill_nsmc{' --smoke' if args.smoke else ''} on {device}, data {data.name}, split by "
            f"{args.split_field or 'text hash'}; {total:.0f}s in all\n\n" + "\n".join(table)
            + f"\n\nstage times (COMMON={shared}):\n" + "\n".join(stages) + "\n")
    print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "distill_nsmc.md").write_text(text)
        (Path(out) / "distill_nsmc.json").write_text(json.dumps({"rows": rows, "stages": log, "device": device,
                                                                 "seconds": total}, indent=1, default=str))
    scratch = rows["student, from scratch"]["bits_per_char"]
    for label in ("student, distilled", "student, pruned + distilled"):
        verdict = "beats" if rows[label]["bits_per_char"] < scratch else "does NOT beat"
        print(f"{label} {verdict} the student from scratch: {rows[label]['bits_per_char']:.4f} vs {scratch:.4f} bits/char")
    return 0


if __name__ == "__main__":
    sys.exit(main())
