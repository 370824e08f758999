"""GGUF export: transformers' GGUF loader reads each file; its tokenizer and logits agree with JAX."""
import jax.numpy as jnp
import numpy as np
import pytest
from extras import needs, optional

from kslm_jax.export import gguf_io

torch, transformers, gguf = optional("torch"), optional("transformers"), optional("gguf")

SENTENCES = ["대한민국의 주권은 국민에게 있고,", "이 법은 공포한 날부터 시행한다. 2024년 ㅋㅋ"]
# Largest |logit difference| allowed: float16 weights are close; 8-bit and 4-bit blocks are coarser.
TOLERANCE = {"f16": 0.02, "q8_0": 0.1, "q4_0": 0.6}


def test_rope_permutation_matches_interleaved_rotation():
    """Rotating HF-ordered rows by halves equals rotating the permuted rows by adjacent pairs."""
    rng = np.random.default_rng(0)
    heads, hd = 2, 8
    q = rng.standard_normal((heads * hd,))
    theta = rng.standard_normal(hd // 2)
    def half(x):
        x1, x2 = x[: hd // 2], x[hd // 2:]
        return np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)])
    def pairs(x):
        a, b = x[0::2], x[1::2]
        out = np.empty_like(x)
        out[0::2], out[1::2] = a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)
        return out
    hf_rot = np.concatenate([half(q[h * hd:(h + 1) * hd]) for h in range(heads)])
    perm = gguf_io.rope_permute(q[:, None], heads)[:, 0]
    gg_rot = np.concatenate([pairs(perm[h * hd:(h + 1) * hd]) for h in range(heads)])
    np.testing.assert_allclose(gguf_io.rope_permute(hf_rot[:, None], heads)[:, 0], gg_rot, atol=1e-12)


@needs("export", "torch", "transformers", "gguf")
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_gguf_loads_in_transformers_and_matches(trained_tiny, tmp_path, quant):
    wd, sp, params = trained_tiny.workdir, trained_tiny.sp, trained_tiny.params
    path = gguf_io.export_gguf(wd, tmp_path / f"model-{quant}.gguf", quant)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    for text in SENTENCES:
        ids = [2] + sp.EncodeAsIds(text)
        assert tok(text)["input_ids"] == ids, text
        ours = np.asarray(trained_tiny.model.apply({"params": params}, jnp.asarray([ids])))
        with torch.no_grad():
            theirs = model(torch.tensor([ids])).logits.numpy()
        assert np.abs(theirs - ours).max() < TOLERANCE[quant]
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.9
