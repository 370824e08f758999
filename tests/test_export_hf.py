"""Hugging Face export: transformers loads it offline and its logits match JAX; JAX → HF → JAX is exact."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, right_padded
from extras import needs, optional

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import hf_io
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io
from kslm_jax.train import hf_import

pytestmark = needs("export", "torch", "transformers", "safetensors")
torch, transformers = optional("torch"), optional("transformers")

SENTENCES = ["대한민국의 주권은 국민에게 있고,", "이 법은 공포한 날부터 시행한다.", "국회는 법률에 저촉되지 아니하는 범위 안에서"]


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def source(request):
    """(workdir, config, params) to export. Tied: the suite's trained tiny model (tiny_ko ties its embeddings),
    a checkpoint written by training. Untied: the same shapes with random weights (std 0.3: peaked logits, so a
    layout mistake cannot hide) saved as a plain checkpoint, which costs no training-step compile."""
    if request.param:
        trained_tiny = request.getfixturevalue("trained_tiny")
        assert trained_tiny.cfg.model.tie_embeddings
        return trained_tiny.workdir, trained_tiny.cfg, trained_tiny.params
    workdir = request.getfixturevalue("workdir")
    cfg = workdir_lib.config_for(workdir, None, ["model.tie_embeddings=False"], force=True)
    _, params = random_params(llama.ModelConfig.from_config(cfg), seed=2, std=0.3)
    finetune_io.save_plain(cfg, params, workdir, force=True)
    return workdir, cfg, params


def test_export_matches_transformers_and_round_trips(source, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    wd, cfg, params = source
    tie = cfg.model.tie_embeddings
    out = hf_io.export_hf(wd, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}

    sp = tok_lib.check_workdir(cfg, wd)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert bool(hf_model.config.tie_word_embeddings) == tie
    tok = transformers.LlamaTokenizer.from_pretrained(str(out))
    rows = [[2] + sp.EncodeAsIds(text) for text in SENTENCES]
    for ids, text in zip(rows, SENTENCES):
        assert tok(text)["input_ids"] == ids, text
    # One right-padded batch (pad id 0) through both: causal models, same ids, padding included.
    ids = right_padded(rows)
    model = llama.Transformer(llama.ModelConfig.from_config(cfg))
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)).logits.numpy()
    assert ours.std() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

    back = hf_import.import_hf(out, tmp_path / "imported")
    restored = finetune_io.restore_params_host(workdir_lib.config_for(back, None, []), back)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_import_refuses_bad_input(tmp_path, prepared):
    from kslm_jax.core.errors import KslmError
    with pytest.raises(KslmError, match="config.json"):
        hf_import.import_hf(tmp_path / "nothing", tmp_path / "w")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(KslmError, match="gpt2"):
        hf_import.import_hf(tmp_path / "gpt", tmp_path / "w")
