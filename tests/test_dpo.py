"""Preference tuning (finetune.kind=dpo) on real NSMC pairs with the suite's tiny trained model: the loss and its
gradient against a float64 numpy reference, beta -> 0, empty responses refused by name, exact accumulation,
and a LoRA run that trains and resumes bit-exact (full fine-tuning is the same objective with the decoder in
the state, run by benchmarks/dpo_nsmc.py)."""
import gzip
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, preference_data
from kslm_jax.objectives import dpo, preference
from kslm_jax.train import step as step_lib

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"
PROMPT = "영화 리뷰:"
RUN = ["data.seq_len=64", "train.batch_size=8", "mesh.data=1", "logging.progress_bar=false", "train.log_every=1",
       "optim.warmup_steps=1", "optim.lr=3e-3", "checkpoint.every_steps=1000", "finetune.kind=dpo",
       "finetune.template={prompt} {response}", "finetune.eval_examples=16", "finetune.dpo_beta=0.5"]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(trained_tiny, tmp_path_factory):
    """Short NSMC reviews paired positive (rating >= 9) over negative (<= 3) after one shared prompt."""
    root = tmp_path_factory.mktemp("dpo")
    with gzip.open(DATA / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        reviews = [json.loads(line) for line in itertools.islice(f, 6000)]
    short = [r for r in reviews if 2 <= len(r["text"].strip()) <= 14]
    pos = [r["text"] for r in short if r["rating"] >= 9]
    neg = [r["text"] for r in short if r["rating"] <= 3]
    pairs = [{"prompt": PROMPT, "chosen": c, "rejected": r} for c, r in zip(pos, neg)][:240]
    return SimpleNamespace(root=root, base=trained_tiny.workdir, sp=trained_tiny.sp, pairs=pairs,
                           file=_write(root / "pairs.jsonl", pairs))


def _cfg(env, *overrides, file=None):
    return config_lib.load(None, RUN + [f"finetune.init_from={env.base}",
                                        f"finetune.train_files={file or env.file}", *overrides])


def _run(env, name, cfg, sigterm_at=None, then=True):
    wd = env.root / name
    workdir_lib.bind(wd, cfg, force=True)
    trainer = dpo.trainer(cfg, wd)
    if sigterm_at:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KSLM_FAULT_SIGTERM_AT_STEP", str(sigterm_at))
            assert trainer.fit()["stopped_by"] == "SIGTERM"
        if not then:
            return wd, trainer, None
        trainer.state = None  # state and data position come back from the checkpoint
    return wd, trainer, trainer.fit()


def _metrics(wd):
    return [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ the loss itself

def _numpy_loss_and_grad(logits, ref_logits, batch, beta, kind):
    """Summed loss over pairs and its gradient wrt the policy logits, float64, one pair at a time."""
    def logp(x):
        x = x.astype(np.float64)
        return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    lp, ref = logp(logits), logp(ref_logits)
    seg, mask, tg = batch["segment_ids"], batch["loss_mask"] > 0, batch["targets"]
    total, grad, pairs = 0.0, np.zeros_like(lp), 0
    for b in range(seg.shape[0]):
        for k in range(1, seg[b].max() // 2 + 1):
            sides = [(seg[b] == 2 * k - 1 + h) & mask[b] for h in (0, 1)]
            t = [np.flatnonzero(s) for s in sides]
            pi = [lp[b, ti, tg[b, ti]].sum() for ti in t]
            rf = [ref[b, ti, tg[b, ti]].sum() for ti in t]
            h = (pi[0] - rf[0]) - (pi[1] - rf[1])
            if kind == "dpo":
                total += np.logaddexp(0.0, -beta * h)
                dh = -beta / (1.0 + np.exp(beta * h))
            else:
                total += (h - 1 / (2 * beta)) ** 2
                dh = 2 * (h - 1 / (2 * beta))
            for sign, ti in zip((1.0, -1.0), t):  # d log p(target) / d logits = onehot - softmax
                g = -np.exp(lp[b, ti])
                g[np.arange(len(ti)), tg[b, ti]] += 1.0
                grad[b, ti] += sign * dh * g
            pairs += 1
    return total, grad, pairs


def _loss_of_logits(batch, pairs, beta, kind):
    def f(logits, ref_logits):
        pi_c, pi_r, _, _, valid = preference.response_logps(logits, batch, pairs)
        ref_c, ref_r, _, _, _ = preference.response_logps(ref_logits, batch, pairs)
        return preference.summed(pi_c, pi_r, ref_c, ref_r, valid, beta, kind)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.fixture(scope="module")
def packed(env):
    cfg = _cfg(env)
    data = preference_data.build(cfg, env.sp)
    # rows of 128 positions hold several pairs of at most 64 (the training rows hold one or two)
    batch = next(examples.one_pass(data.train.pairs, 8, 128, preference_data.max_pairs(cfg.data.max_segments_per_row),
                                   fill_fn=preference_data.fill))[0]
    rng = np.random.default_rng(0)
    shape = (*batch["inputs"].shape, 50)
    batch = dict(batch, targets=batch["targets"] % 50)  # a 50-token vocabulary keeps the numpy side small
    return SimpleNamespace(cfg=cfg, data=data, batch=batch, logits=rng.normal(0, 2, shape).astype(np.float32),
                           ref=rng.normal(0, 2, shape).astype(np.float32))


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
def test_loss_and_gradient_match_float64_numpy(packed, kind):
    b = packed.batch
    seg = b["segment_ids"]
    assert (np.bincount(seg[seg > 0])[1:] > 0).all() and seg.max() >= 4  # rows hold two pairs or more
    (total, aux), grad = _loss_of_logits(b, 32, 0.5, kind)(packed.logits, packed.ref)
    want, want_grad, pairs = _numpy_loss_and_grad(packed.logits, packed.ref, b, 0.5, kind)
    assert int(aux["tokens"]) == pairs == sum(int(s.max()) // 2 for s in seg)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-5 * np.abs(want_grad).max())
    # the prompt positions and padding carry no gradient: only response tokens count
    assert np.abs(np.asarray(grad))[b["loss_mask"] == 0].max() == 0


def test_gradient_vanishes_as_beta_goes_to_zero(packed):
    norms = {}
    for beta in (1e-3, 1e-6):
        (_, aux), grad = _loss_of_logits(packed.batch, 32, beta, "dpo")(packed.logits, packed.ref)
        norms[beta] = float(jnp.linalg.norm(grad))
    # DPO's gradient is beta * sigmoid(-beta h) * grad h: proportional to beta as beta -> 0
    assert norms[1e-6] < 1e-4 and norms[1e-6] / norms[1e-3] == pytest.approx(1e-3, rel=1e-2)


def test_accumulation_over_two_micro_batches_gives_the_same_gradient(packed):
    """The step divides the summed gradient by the pairs of the whole batch: with 2 micro-batches holding
    different numbers of pairs, the gradient is that of one batch (a mean of per-micro-batch means is not)."""
    batch = {k: np.array(v) for k, v in packed.batch.items()}
    for v in batch.values():
        v[0] = 0  # an empty row
    seg = batch["segment_ids"]
    assert 0 < sum(int(s.max()) // 2 for s in seg[:4]) < sum(int(s.max()) // 2 for s in seg[4:])
    batch.update(logits=packed.logits, ref=packed.ref)

    def loss(params, extra, b, rng):  # a scale on the policy logits stands in for the model's parameters
        pi_c, pi_r, _, _, valid = preference.response_logps(b["logits"] * params["scale"], b, 32)
        ref_c, ref_r, _, _, _ = preference.response_logps(b["ref"], b, 32)
        return preference.summed(pi_c, pi_r, ref_c, ref_r, valid, 0.5, "dpo")
    params, rng = {"scale": jnp.float32(1.0)}, jax.random.PRNGKey(0)
    grad = jax.jit(lambda p, b, k: step_lib.accumulate(loss, p, None, b, rng, k)[0]["scale"], static_argnums=2)
    one = grad(params, batch, 1)
    two = grad(params, jax.tree.map(lambda x: x.reshape(2, -1, *x.shape[1:]), batch), 2)
    assert abs(float(one)) > 1e-3
    np.testing.assert_allclose(float(two), float(one), rtol=1e-5)


def test_empty_or_missing_response_is_refused_by_name(env):
    rows = [dict(r) for r in env.pairs[:4]]
    rows[2]["rejected"] = "   "
    bad = _write(env.root / "empty.jsonl", rows)
    with pytest.raises(KslmError, match=rf"^{bad} line 3: the rejected response \(field 'rejected'\) is empty"):
        preference_data.build(_cfg(env, file=bad), env.sp)
    del rows[1]["chosen"]
    rows[2]["rejected"] = "좋아요"
    bad = _write(env.root / "missing.jsonl", rows)
    with pytest.raises(KslmError, match=rf"^{bad} line 2: no chosen in field 'chosen'"):
        preference_data.build(_cfg(env, file=bad), env.sp)


# ------------------------------------------------------------------------------------------ training

def test_lora_dpo_trains_logs_and_resumes_bit_exact(env):
    """LoRA with the DPO loss: only the adapters train, beside the frozen base and the bf16 reference; the reward
    margin grows from 0; the TensorBoard scalars are there; a run stopped by SIGTERM after step 2 and resumed by
    `kslm train`'s path in a new trainer has the losses and the held-out results of the straight run."""
    cfg = _cfg(env, "lora.rank=4", "lora.targets=q,v", "train.steps=4", "checkpoint.every_steps=2",
               "optim.lr=1e-2", "train.batch_size=16")
    wd, straight, summary = _run(env, "straight", cfg)
    assert set(straight.state.params) == {"adapters"} and set(straight.extra) == {"base", "reference"}
    assert {x.dtype for x in jax.tree.leaves(straight.extra["reference"])} == {jnp.dtype(jnp.bfloat16)}
    # only the adapters train: per layer (2), rank 4 on q (64 in, 4 heads x 16 out) and v (64 in, 2 x 16 out)
    assert straight.objective.param_report()["trainable"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    rows = [r for r in _metrics(wd) if "train/reward_margin" in r]
    for key in ("chosen_logp", "rejected_logp", "accuracy", "chosen_reward", "rejected_reward"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in rows)
    # the policy starts as the (bf16) reference: margin ~0 and loss -log sigmoid(0)
    assert abs(rows[0]["train/reward_margin"]) < 0.05 and rows[0]["train/loss"] == pytest.approx(np.log(2), abs=0.02)
    assert rows[-1]["train/reward_margin"] > 0.05 and rows[-1]["train/loss"] < rows[0]["train/loss"]
    ev = summary["eval"]
    assert ev["pairs"] == min(16, len(straight.objective.data.val.pairs)) > 0 and ev["reward_margin"] > 0
    # The frozen reference's held-out log-probs come from the first eval of that index set; later evals reuse
    # them and never run the reference, and they equal a fresh computation.
    obj = straight.objective
    assert len(obj._ref_cache) == 1
    ref_stats, obj._ref_stats = obj._ref_stats, None
    cached = obj.evaluate(straight.state)
    obj._ref_cache.clear()
    obj._ref_stats = ref_stats
    assert cached == obj.evaluate(straight.state) and cached["reward_margin"] == ev["reward_margin"]

    rwd = env.root / "resumed"
    _run(env, "resumed", cfg, sigterm_at=2, then=False)
    dpo.train(cfg, rwd)  # a new trainer restores step 2 and the data position, finishes, writes its results

    def losses(w):
        return {r["step"]: r["train/loss"] for r in _metrics(w) if "train/loss" in r}
    assert losses(rwd) == losses(wd) and sorted(losses(wd)) == list(range(1, 5))
    result = json.loads((rwd / "eval" / "finetune.json").read_text())
    assert result["kind"] == "dpo" and result["step"] == 4 and result["eval"] == ev
