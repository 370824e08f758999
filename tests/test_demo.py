"""The README's main job, end to end: `kslm demo` trains a model that beats the unigram baseline."""
import json
import subprocess
import sys
from pathlib import Path

import cpu_env

REPO = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    """The README's main job as a user runs it, every stage, with 60 of its 150 training steps: those cost most
    of this test's time, and the model already beats the unigram at step 50 (4.81 vs 5.39 bits per character in
    a full demo run)."""
    env = cpu_env.one_device_env(fast_compile=False)
    wd = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "kslm_jax", "demo", "--workdir", str(wd), "--config.train.steps=60",
                           "--config.optim.warmup_steps=12"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("== prepare", "== tokenizer", "== tokenize", "== train", "== held-out evaluation", "== generate"):
        assert stage in out
    assert "the trained model beats the unigram model" in out
    result = json.loads((wd / "eval" / "lm.json").read_text())
    assert result["model"]["bits_per_char"] < result["unigram"]["bits_per_char"] < result["before"]["bits_per_char"]
    samples = out.split("== generate")[1].strip().splitlines()[:3]
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in s) for s in samples)
    assert (wd / "tensorboard").is_dir() and (wd / "checkpoints" / "60").is_dir()
