"""model.arch=gru|lstm: the state restarts at every document of a packed row, generation carries the state as
its cache, and the recurrent model trains, resumes bit-exactly, evaluates and generates from the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import logged_losses
from cli_inproc import kslm

from kslm_jax.core import checkpoint
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.eval import generate
from kslm_jax.model import arch, recurrent
from kslm_jax.objectives import lm
from kslm_jax.train import objective as objective_lib

ARCHES = ("gru", "lstm")
VOCAB = 64


def _model(kind: str):
    # A large embedding std gives peaked logits, so a greedy comparison cannot pass on near-ties.
    c = recurrent.RecurrentConfig(arch=kind, vocab_size=VOCAB, d_model=16, n_layers=2, tie_embeddings=True,
                                  init_std=0.5)
    model = recurrent.RecurrentLM(c)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                               is_leaf=lambda x: hasattr(x, "unbox"))


@pytest.mark.parametrize("kind", ARCHES)
def test_packed_row_equals_each_document_alone(kind):
    model, params = _model(kind)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, VOCAB, n) for n in (5, 7, 4)]
    # One batch, one compile. Row 0: the three documents packed (16 tokens, 4 of padding). Rows 1-3: each
    # document alone at the start of a row. Row 4: row 0's tokens read as a single document.
    t = 20
    tokens, positions, segments = (np.zeros((5, t), np.int32) for _ in range(3))
    at = 0
    for s, d in enumerate(docs, 1):
        n = len(d)
        tokens[0, at:at + n], positions[0, at:at + n], segments[0, at:at + n] = d, np.arange(n), s
        tokens[s, :n], positions[s, :n], segments[s, :n] = d, np.arange(n), 1
        at += n
    tokens[4], positions[4], segments[4, :at] = tokens[0], np.arange(t), 1
    out = np.asarray(jax.jit(model.apply)({"params": params}, tokens, positions, segments))
    at = 0
    for s, d in enumerate(docs, 1):
        np.testing.assert_allclose(out[0, at:at + len(d)], out[s, :len(d)], atol=1e-5, rtol=1e-5)
        at += len(d)
    # Read as one document, the same tokens give other logits after the first boundary: the reset matters.
    assert np.abs(out[4, 5:16] - out[0, 5:16]).max() > 1e-2


@pytest.mark.parametrize("kind", ARCHES)
def test_generate_with_state_equals_full_recompute(kind):
    model, params = _model(kind)
    prompt, new = [1, 17, 5, 40, 9], 10
    out = generate.generate_ids(model, params, prompt, max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0,
                                rng=jax.random.PRNGKey(0), vocab_limit=VOCAB, stop_id=None)
    # Greedy decoding by full forward passes over everything so far, no state kept. The row has a fixed
    # width (one compile); the model is causal, so the zeros after the last token change nothing before it.
    full_pass = jax.jit(model.apply)
    seq = np.zeros((1, len(prompt) + new), np.int32)
    seq[0, :len(prompt)] = prompt
    for p in range(len(prompt), len(prompt) + new):
        seq[0, p] = int(jnp.argmax(full_pass({"params": params}, seq)[0, p - 1]))
    assert out == seq[0, len(prompt):].tolist()
    # The cached logits of every step equal the full pass's, not only their argmax.
    full = np.asarray(full_pass({"params": params}, seq))
    cache = arch.init_cache(model.c, 1, 0)
    logits, cache = generate.forward_cached(model, params, jnp.asarray(seq[:, :5]),
                                            jnp.arange(5, dtype=jnp.int32)[None], cache)
    steps = [np.asarray(logits[0])]
    for p in range(5, seq.shape[1]):
        logits, cache = generate.forward_cached(model, params, jnp.asarray(seq[:, p:p + 1]),
                                                jnp.asarray([[p]], jnp.int32), cache)
        steps.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(steps), full[0], atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == seq.shape[1]


def _cli(*argv) -> str:
    """Stdout of `kslm ARGV`, run in this process (tests/cli_inproc.py), which must exit 0."""
    proc = kslm(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


GRU = ["model.arch=gru", "train.steps=12", "checkpoint.every_steps=4", "optim.warmup_steps=2"]


def _params(wd):
    t = lm.trainer(workdir_lib.config_for(wd, None, [], force=True), wd)
    with jax.set_mesh(t.mesh):
        step, state = checkpoint.restore_params(t.paths["checkpoints"], t.abstract)
    return step, jax.tree.map(np.asarray, state.params)


def test_gru_trains_resumes_bit_exact_evaluates_and_generates_from_the_cli(workdir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    __import__("shutil").copytree(workdir, straight)
    _cli("train", "--workdir", straight, *[f"--config.{o}" for o in GRU])
    losses = logged_losses(straight)
    assert np.mean([losses[s] for s in (1, 2)]) - np.mean([losses[s] for s in (11, 12)]) > 0.5
    step, params = _params(straight)
    assert step == 12 and "layers_1" in params and "gru" in params["layers_0"]

    monkeypatch.setenv("KSLM_FAULT_SIGTERM_AT_STEP", "6")
    cfg = workdir_lib.config_for(workdir, None, GRU, force=True)
    assert lm.trainer(cfg, workdir).fit()["stopped_by"] == "SIGTERM"
    monkeypatch.delenv("KSLM_FAULT_SIGTERM_AT_STEP")
    assert lm.trainer(workdir_lib.config_for(workdir, None, GRU, force=True), workdir).fit()["step"] == 12
    assert {s: v for s, v in logged_losses(workdir).items() if s > 6} == {s: v for s, v in losses.items() if s > 6}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(workdir)[1])):
        np.testing.assert_array_equal(a, b)

    assert "model (step 12)" in _cli("eval", "--workdir", straight)
    assert _cli("generate", "--workdir", straight, "--prompt", "대한민국", "--max-new-tokens", "8").startswith("대한민국")
    (tmp_path / "ppl.txt").write_text("대한민국은 민주공화국이다.\n\n국회는 법률을 제정한다.\n", encoding="utf-8")
    _cli("eval", "--workdir", straight, "--tasks", f"ppl={tmp_path / 'ppl.txt'}")
    assert json.loads((straight / "eval" / "ppl.json").read_text())["bits_per_char"] > 0


def test_decoder_only_commands_refuse_a_recurrent_run(workdir):
    cfg = workdir_lib.config_for(workdir, None, ["model.arch=lstm"], force=True)
    with pytest.raises(KslmError, match="kslm export needs the decoder, and this run has model.arch=lstm"):
        arch.require_decoder(cfg, "kslm export")
    with pytest.raises(KslmError, match="model.arch=lstm: fine-tuning and distillation need the decoder"):
        workdir_lib.config_for(workdir, None, ["model.arch=lstm", "distill.teacher=x"], force=True)


def test_flops_count_matches_the_parameters():
    for kind in ARCHES:
        model, params = _model(kind)
        # Tied embeddings: every parameter is used once per token, the output matrix included.
        assert recurrent.flops_per_token(model.c) == 6.0 * sum(x.size for x in jax.tree.leaves(params))


def test_recurrent_state_is_sharded_by_the_decoder_rules(workdir):
    """fsdp splits the cells' kernels along `embed` (their input side), as it splits the decoder's; no compile."""
    cfg = workdir_lib.config_for(workdir, None, ["model.arch=gru", "mesh.data=2", "mesh.fsdp=4"], force=True)
    shardings = lm.LM(objective_lib.Setup.of(cfg, workdir)).shardings
    kernels = [(jax.tree_util.keystr(path), s.spec) for path, s in jax.tree_util.tree_leaves_with_path(shardings)
               if "gru" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    # 2 layers x 6 kernels, in the parameters and in both AdamW moments
    assert len(kernels) == 36 and all(tuple(spec) == ("fsdp", None) for _, spec in kernels), kernels
    assert tuple(shardings.params["embed_tokens"]["embedding"].spec) == ("tensor", "fsdp")  # as the decoder's


def test_untied_output_layer_builds_and_runs():
    """The schema's default tie_embeddings=False gives the recurrent model llama's Linear as its lm_head."""
    c = recurrent.RecurrentConfig(arch="gru", vocab_size=VOCAB, d_model=16, n_layers=1, tie_embeddings=False)
    model = recurrent.RecurrentLM(c)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
    assert "lm_head" in params
    assert model.apply({"params": params}, tokens).shape == (1, 8, VOCAB)
