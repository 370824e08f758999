"""model.arch=encoder: bidirectional attention inside each packed document and never across, the masked-LM
objective (rates, whole eojeols, loss only at chosen positions, exact accumulation), first/mean pooling,
CLI train → eval → resume bit-exact, the refusals, and the EuroBERT export's logits."""
import gzip
import itertools
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, logged_losses, random_params
from cli_inproc import kslm
from extras import needs, optional
from one_line import one_line_error

from kslm_jax.cli import commands
from kslm_jax.core import checkpoint
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import attention, classify, llama
from kslm_jax.objectives import finetune, mlm
from kslm_jax.train import step as step_lib

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"
ENC = ["model.arch=encoder", "tokenizer.special_tokens=<|mask|>"]
SMALL = llama.ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32,
                          causal=False, scan_layers=False)


def _packed():
    """Row 0: doc A (6 tokens), doc B (5), 5 of padding."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 64, (1, 16)).astype(np.int32)
    seg = np.asarray([[1] * 6 + [2] * 5 + [0] * 5], np.int32)
    pos = np.asarray([list(range(6)) + list(range(5)) + [0] * 5], np.int32)
    tokens[seg == 0] = 0
    return tokens, pos, seg


def test_each_token_sees_its_whole_document_and_nothing_else():
    model, params = random_params(SMALL)
    tokens, pos, seg = _packed()
    rows = np.repeat(tokens, 4, 0)
    rows[1, 8] = (rows[1, 8] + 7) % 60 + 4      # doc B changed
    rows[2, 5] = (rows[2, 5] + 7) % 60 + 4      # doc A's last token changed
    rows[3, 13] = 9                             # padding changed
    out = np.asarray(jax.jit(model.apply)({"params": params}, rows, np.repeat(pos, 4, 0), np.repeat(seg, 4, 0)))
    np.testing.assert_array_equal(out[1, :6], out[0, :6])         # A never sees B
    np.testing.assert_array_equal(out[3, :11], out[0, :11])       # nobody sees padding
    assert np.abs(out[2, :5] - out[0, :5]).max(-1).min() > 1e-3  # every earlier token of A sees A's last one
    assert np.abs(out[1, 6:11] - out[0, 6:11]).max() > 1e-4
    # the masks the kernels read say the same: a whole document (cudnn's is_causal=False, splash's FullMask and
    # tokamax's [start, end) ranges are checked against this reference where those kernels run)
    mask = np.asarray(attention.packed_mask(pos, pos, seg, seg, causal=False))[0]
    assert mask[0, 5] and not mask[0, 6] and mask[10, 6] and not mask[10, 11] and not mask[:11, 11:].any()
    ranges = attention.starts_mask(attention.document_starts(seg), attention.document_ends(seg))
    np.testing.assert_array_equal(np.asarray(ranges)[0], mask)


def _tables(vocab=64):
    """A made-up vocabulary: ids 0-3 control, 4 the mask piece, even ids from 6 open an eojeol."""
    ids = np.arange(vocab)
    control = ids < 4
    opens = control | (ids == 4) | ((ids % 2 == 0) & (ids >= 6))
    return {"opens": opens, "control": control, "ordinary": np.flatnonzero(ids >= 5)}


MCFG = SimpleNamespace(rate=0.15, mask=0.8, random=0.1, whole_eojeol=False)


def test_masking_rates_are_15_percent_and_80_10_10():
    rng = np.random.default_rng(1)
    b, t = 64, 512
    tokens = rng.integers(5, 4096, (b, t)).astype(np.int32)
    tokens[:, 0], tokens[:, 300] = 2, 3                                     # BOS, EOS: never chosen
    seg = np.ones((b, t), np.int32)
    seg[:, 400:] = 0                                                         # padding: never chosen
    tables = _tables(4096)
    inputs, chosen = jax.jit(lambda k: mlm.mask_tokens(k, tokens, np.zeros_like(tokens), seg, tables, MCFG, 4))(
        jax.random.PRNGKey(0))
    inputs, chosen = np.asarray(inputs), np.asarray(chosen)
    real = (seg > 0) & (tokens > 3)
    assert not chosen[~real].any() and (inputs[~chosen] == tokens[~chosen]).all()
    assert chosen.sum() / real.sum() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum()
    masked, kept = (inputs[chosen] == 4).sum() / n, (inputs[chosen] == tokens[chosen]).sum() / n
    assert masked == pytest.approx(0.8, abs=0.015) and kept == pytest.approx(0.1, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)
    assert (inputs[chosen] >= 4).all()                                       # replacements are ordinary pieces


def test_whole_eojeol_masking_chooses_every_piece_of_a_word_together():
    rng = np.random.default_rng(2)
    b, t = 32, 256
    tokens = rng.integers(5, 64, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    tables = _tables()
    cfg = SimpleNamespace(**{**vars(MCFG), "whole_eojeol": True})
    _, chosen = jax.jit(lambda k: mlm.mask_tokens(k, tokens, pos, seg, tables, cfg, 4))(jax.random.PRNGKey(3))
    chosen = np.asarray(chosen)
    start = np.asarray(mlm.word_starts(tokens, pos, seg, tables))
    first = np.maximum.accumulate(np.where(start, np.arange(t), 0), axis=1)     # each piece's word start
    np.testing.assert_array_equal(chosen, np.take_along_axis(chosen, first, axis=1))  # a word whole, or not
    assert (chosen & ~start).sum() > 100                                   # words of several pieces were chosen
    assert chosen[start].mean() == pytest.approx(0.15, abs=0.02)          # 15% of the words


def test_loss_counts_chosen_positions_only_and_accumulation_is_exact():
    model, params = random_params(SMALL)
    tokens, pos, seg = (np.repeat(a, 4, 0) for a in _packed())
    tables = _tables()
    key = jax.random.PRNGKey(5)
    inputs, chosen = mlm.mask_tokens(key, tokens, pos, seg, tables, MCFG, 4)
    chosen = np.asarray(chosen) | (np.arange(16) == 2)[None]  # at least one chosen position per row

    # One compile: the same shapes serve every call below.
    grad_of = jax.jit(jax.value_and_grad(lambda p, x, tg, ch: mlm.chosen_sums(model, p, x, tg, ch, pos, seg)[
        "ce_sum"]))

    def grad(targets):
        return grad_of(params, inputs, targets, chosen)
    other = tokens.copy()
    other[~chosen] = (other[~chosen] + 1) % 64                             # every unchosen target changed
    (l1, g1), (l2, g2) = grad(tokens), grad(other)
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)
    moved = tokens.copy()
    moved[0, 2] = (moved[0, 2] + 1) % 64                                  # a chosen target changed
    assert float(grad(moved)[0]) != float(l1)

    # Two micro-batches, each masked with its own key fold_in(rng, i), give the gradient of the whole batch
    # masked the same way, divided by the chosen count of the whole batch.
    loss = mlm.mlm_loss(model, 0.0, tables, MCFG, 4)
    batch = {"inputs": tokens, "positions": pos, "segment_ids": seg}
    micro = jax.tree.map(lambda a: a.reshape(2, 2, *a.shape[1:]), batch)
    g_acc, aux = jax.jit(lambda p: step_lib.accumulate(loss, p, None, micro, key, 2))(params)
    parts = [mlm.mask_tokens(jax.random.fold_in(key, i), tokens[2 * i:2 * i + 2], pos[:2], seg[:2], tables, MCFG, 4)
             for i in range(2)]
    whole_in, whole_chosen = (jnp.concatenate([p[k] for p in parts]) for k in (0, 1))
    n = whole_chosen.sum()
    g_one = jax.tree.map(lambda g: g / n, grad_of(params, whole_in, tokens, whole_chosen)[1])
    assert int(aux["tokens"]) == int(n)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_one)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_pooling_first_last_mean():
    rng = np.random.default_rng(4)
    h = rng.normal(size=(1, 16, 3)).astype(np.float32)
    _, _, seg = _packed()
    batch = {"segment_ids": seg, "cls_index": np.asarray([[5, 10, 0]], np.int32)}
    np.testing.assert_allclose(classify.pool(h, batch, "first")[0, :2], h[0, [0, 6]])
    np.testing.assert_allclose(classify.pool(h, batch, "last")[0, :2], h[0, [5, 10]])
    np.testing.assert_allclose(classify.pool(h, batch, "mean")[0, :2], [h[0, :6].mean(0), h[0, 6:11].mean(0)],
                               rtol=1e-6)


def test_config_refuses_what_an_encoder_cannot_do():
    with pytest.raises(KslmError, match="mlm.token=<|mask|>.*tokenizer.special_tokens"):
        config_lib.load("tiny_ko", ["model.arch=encoder"])
    with pytest.raises(KslmError, match="finetune.kind=sft and distillation need a causal decoder"):
        config_lib.load("tiny_ko", ENC + ["finetune.kind=sft", "finetune.train_files=x.jsonl"])
    with pytest.raises(KslmError, match="a causal decoder's first token sees only itself"):
        config_lib.load("cls_tiny", ["finetune.pool=first"])
    assert classify.pool_of(config_lib.load("cls_tiny", ENC)) == "first"
    assert classify.pool_of(config_lib.load("cls_tiny", [])) == "last"


# ------------------------------------------------------------------------------------- the CLI, end to end

def _cli(*argv) -> str:
    """Stdout of `kslm ARGV`, run in this process (tests/cli_inproc.py), which must exit 0."""
    proc = kslm(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def enc_workdir(tmp_path_factory, prepared):
    """The prepared corpus with a tokenizer that has <|mask|>, trained 12 steps as an encoder from the CLI."""
    wd = tmp_path_factory.mktemp("encoder") / "run"
    shutil.copytree(prepared, wd, ignore=shutil.ignore_patterns("tokenizer", "tokens"))
    args = SimpleNamespace(workdir=str(wd), config="encoder_tiny_ko", force=True)
    for stage in (commands.tokenizer, commands.tokenize):
        stage(args, TINY + ENC)
    clean = tmp_path_factory.mktemp("encoder") / "clean"
    shutil.copytree(wd, clean)
    _cli("train", "--workdir", wd, *[f"--config.{o}" for o in RUN])
    return SimpleNamespace(trained=wd, clean=clean)


RUN = ["train.steps=12", "checkpoint.every_steps=4", "optim.warmup_steps=2", "optim.lr=1e-2"]


def _params(wd):
    t = mlm.trainer(workdir_lib.config_for(wd, None, [], force=True), wd)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    return step, t, jax.tree.map(np.asarray, state.params)


def test_encoder_trains_evaluates_and_resumes_bit_exact_from_the_cli(enc_workdir, tmp_path, monkeypatch):
    straight = enc_workdir.trained
    losses = logged_losses(straight)
    assert np.mean([losses[s] for s in (1, 2)]) - np.mean([losses[s] for s in (11, 12)]) > 0.3
    step, _, params = _params(straight)
    assert step == 12 and json.loads((straight / "eval" / "mlm.json").read_text())["step"] == 12

    wd = tmp_path / "resumed"
    shutil.copytree(enc_workdir.clean, wd)
    monkeypatch.setenv("KSLM_FAULT_SIGTERM_AT_STEP", "6")
    cfg = workdir_lib.config_for(wd, None, RUN, force=True)
    assert mlm.trainer(cfg, wd).fit()["stopped_by"] == "SIGTERM"
    monkeypatch.delenv("KSLM_FAULT_SIGTERM_AT_STEP")
    _cli("train", "--workdir", wd)
    assert {s: v for s, v in logged_losses(wd).items() if s > 6} == {s: v for s, v in losses.items() if s > 6}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(wd)[2])):
        np.testing.assert_array_equal(a, b)

    line = _cli("eval", "--workdir", straight)
    assert line.startswith("masked LM at step 12: loss") and "accuracy" in line
    one_line_error(kslm("generate", "--workdir", straight, "--prompt", "대한민국"),
                   "kslm generate needs a causal model, and this run has model.arch=encoder")
    one_line_error(kslm("eval", "--workdir", straight, "--tasks", f"kornli={DATA / 'kornli_xnli_dev.tsv'}"),
                   "task kornli scores the next token, which an encoder")


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_cls_from_an_encoder_pools_first_or_mean_and_learns(enc_workdir, tmp_path, pool):
    with gzip.open(DATA / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        reviews = [json.loads(x) for x in itertools.islice(f, 800)]
    src = tmp_path / "nsmc.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews), encoding="utf-8")
    cfg = config_lib.load("cls_tiny", [f"finetune.init_from={enc_workdir.trained}", f"finetune.train_files={src}",
                                       f"finetune.pool={pool}", "finetune.eval_examples=32", "train.steps=12",
                                       "train.eval_every=0", "optim.lr=3e-3", "logging.progress_bar=false",
                                       "checkpoint.every_steps=100"])
    assert cfg.model.arch == "encoder"  # inherited from the base
    wd = tmp_path / "cls"
    workdir_lib.bind(wd, cfg, force=True)
    summary = finetune.trainer(cfg, wd).fit()
    losses = summary["losses"]
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])
    assert 0 <= summary["eval"]["macro_f1"] <= summary["eval"]["accuracy"] <= 1


@needs("export", "torch", "transformers", "safetensors")
def test_export_is_eurobert_and_its_logits_match_on_padded_and_packed_rows(enc_workdir, tmp_path):
    from kslm_jax.export import hf_io
    torch, transformers = optional("torch"), optional("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = hf_io.export_hf(enc_workdir.trained, tmp_path / "hf")
    hf = transformers.EuroBertForMaskedLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    tok = transformers.LlamaTokenizer.from_pretrained(str(out))
    _, t, params = _params(enc_workdir.trained)
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == hf.config.mask_token_id
    a = tok("대한민국의 주권은 국민에게 있고,")["input_ids"]
    b = tok(f"이 법은 {tok.mask_token}한 날부터")["input_ids"]
    ids = np.zeros((3, len(a) + len(b)), np.int64)
    seg = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    ids[0, :len(a)], seg[0, :len(a)], pos[0, :len(a)] = a, 1, np.arange(len(a))      # padded rows
    ids[1, :len(b)], seg[1, :len(b)], pos[1, :len(b)] = b, 1, np.arange(len(b))
    ids[2], seg[2] = a + b, [1] * len(a) + [2] * len(b)                             # a packed row
    pos[2] = list(range(len(a))) + list(range(len(b)))
    ours = np.asarray(t.model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
                                    jnp.asarray(seg, jnp.int32)))
    with torch.no_grad():
        padded = hf(torch.tensor(ids[:2]), attention_mask=torch.tensor(seg[:2] > 0)).logits.numpy()
        block = torch.tensor(seg[2:, None, :, None] == seg[2:, None, None, :])        # documents apart
        packed = hf(torch.tensor(ids[2:]), attention_mask=block, position_ids=torch.tensor(pos[2:])).logits.numpy()
    real = seg[:2] > 0
    np.testing.assert_allclose(padded[real], ours[:2][real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(packed, ours[2:], atol=1e-4, rtol=1e-4)
