"""Weight-only int8/int4: codes in range, error bounded by half a step, and held-out loss barely moves."""
import jax
import numpy as np
import pytest

from kslm_jax.core import workdir as workdir_lib
from kslm_jax.eval import lm as evaluate
from kslm_jax.model import quantize
from kslm_jax.objectives import lm


@pytest.mark.parametrize("mode,levels", [("int8", 127), ("int4", 7)])
def test_matrix_error_is_at_most_half_a_step(mode, levels):
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    codes, scale = quantize.quantize_matrix(w, mode, group=32)
    assert codes.min() >= -levels - (mode == "int4") and codes.max() <= levels
    back = quantize.dequantize(codes, scale, w.shape)
    step = np.broadcast_to(scale, codes.shape).reshape(w.shape)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)


def test_quantized_eval(workdir):
    cfg = workdir_lib.config_for(workdir, None, ["train.steps=25"], force=True)
    trainer = lm.trainer(cfg, workdir)
    trainer.fit()
    full = trainer.evaluate()
    params = jax.tree.map(np.asarray, trainer.state.params)
    results = {}
    for mode in quantize.MODES:
        q, size = quantize.quantize_params(params, trainer.model_cfg, mode)
        trainer.state = trainer.state.replace(params=jax.device_put(q, trainer.shardings.params))
        results[mode] = trainer.evaluate()
        assert size["bytes"] < size["float32_bytes"] / (3.5 if mode == "int8" else 6)
    assert abs(results["int8"]["loss"] - full["loss"]) < 0.01
    assert abs(results["int4"]["loss"] - full["loss"]) < 0.3
    print(evaluate.format_table({"float32": full, **results}))
