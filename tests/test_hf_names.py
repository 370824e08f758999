"""Our parameter tree maps one to one onto Hugging Face LlamaForCausalLM names and shapes, both ways."""
import dataclasses

import jax
import numpy as np
import pytest
from conftest import init_params

from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama

C = llama.ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_and_names(tie):
    c = dataclasses.replace(C, tie_embeddings=tie)
    _, params = init_params(c)
    params = jax.tree.map(np.asarray, params)
    tensors = hf.to_hf(params, c)
    per_layer = {"self_attn.q_proj.weight": (32, 32), "self_attn.k_proj.weight": (16, 32),
                 "self_attn.v_proj.weight": (16, 32), "self_attn.o_proj.weight": (32, 32),
                 "mlp.gate_proj.weight": (64, 32), "mlp.up_proj.weight": (64, 32), "mlp.down_proj.weight": (32, 64),
                 "input_layernorm.weight": (32,), "post_attention_layernorm.weight": (32,)}
    expected = {"model.embed_tokens.weight": (128, 32), "model.norm.weight": (32,)}
    expected.update({f"model.layers.{i}.{k}": v for i in range(2) for k, v in per_layer.items()})
    if not tie:
        expected["lm_head.weight"] = (128, 32)
    assert {k: v.shape for k, v in tensors.items()} == expected
    back = hf.from_hf(tensors, c)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    # Row r of HF's q_proj is head r // head_dim, dimension r % head_dim, as transformers splits it.
    q = params["layers"]["self_attn"]["q_proj"]["kernel"][1]
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.q_proj.weight"][8 * 2 + 3], q[:, 2, 3])
