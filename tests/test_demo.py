"""The README's main job, end to end: `kslm demo` trains a model that beats the unigram baseline."""
import json
import subprocess
import sys
from pathlib import Path

import cpu_env

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    """The README's main job as a user runs it, every stage, with 60 of its 150 training steps at half its batch
    (8 rows): the steps are most of this test's time, and on 2 cores a step of 8 rows costs 0.23 s of CPU against
    0.59 s for 16. Sixty small steps still beat the unigram by a clear margin (4.99 vs 5.39 bits per character;
    30 steps of 16 rows, the same tokens, reached only 5.22)."""
    env = cpu_env.one_device_env(fast_compile=False)
    wd = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "kslm_jax", "demo", "--workdir", str(wd), "--config.train.steps=60",
                           "--config.train.batch_size=8", "--config.optim.warmup_steps=12"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("== prepare", "== tokenizer", "== tokenize", "== train", "== held-out evaluation", "== generate"):
        assert stage in out
    assert "the trained model beats the unigram model" in out
    result = json.loads((wd / "eval" / "lm.json").read_text())
    bits = {row: result[row]["bits_per_char"] for row in ("model", "unigram", "before")}
    assert bits["model"] < bits["unigram"] - 0.25 and bits["unigram"] < bits["before"], bits
    samples = out.split("== generate")[1].strip().splitlines()[:3]
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in s) for s in samples)
    assert (wd / "tensorboard").is_dir() and (wd / "checkpoints" / "60").is_dir()
