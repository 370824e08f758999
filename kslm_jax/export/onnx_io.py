"""`kslm export --format onnx`: torch.onnx's exporter applied to our Hugging Face model, with a KV cache and a mask.

The graph is not built by us: the checkpoint becomes the LlamaForCausalLM that `kslm export --format hf` writes
(same config and tensor names, model/hf_names.py), and torch.onnx.export (the torch.export based exporter, which
needs onnxscript) traces it. Picked over jax2onnx and our former hand-built graph by measurement
(benchmarks/README.md, "ONNX export"): all agree with JAX, and only this one gives a KV cache and a padding mask;
jax2onnx needs unscanned layers and fixed shapes, and would pin orbax-checkpoint below the version we use.

Inputs (opset 18, float32):
- `input_ids` int64 [batch, seq];
- `attention_mask` int64 [batch, past + seq]: 1 for a real token, 0 for padding, over the cached and the new
  tokens. Positions are counted from it (real tokens before each one), so a left-padded row gets the logits it
  gets alone;
- `past_key_values.{i}.key` / `.value` float32 [batch, kv_heads, past, head_dim], with past = 0 on the first call.
Outputs: `logits` float32 [batch, seq, vocab] and `present.{i}.key` / `.value` [batch, kv_heads, past + seq,
head_dim], the next call's past. Weights move to `model.onnx.data` when the protobuf would pass its 2 GB limit.
The folder also holds tokenizer.model, so the graph can be fed without us.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.export import hf_io, write_marker
from kslm_jax.model import arch
from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io

OPSET = 18
# A ModelProto is one protobuf message (2 GiB at most); past this many weight bytes they go to a side file.
EXTERNAL_OVER = 2**31 - 2**26
DATA_FILE = "model.onnx.data"
INPUTS = ("input_ids", "attention_mask")


def cache_names(n_layers: int, prefix: str = "past_key_values") -> list[str]:
    """The cache inputs (or, with prefix "present", outputs) in graph order: layer 0 key, layer 0 value, ..."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def hf_model(params, c: llama.ModelConfig, max_positions: int = 2048):
    """Our parameters in a transformers LlamaForCausalLM (eager attention: every op traces to core ONNX)."""
    import torch
    import transformers
    config = transformers.LlamaConfig(**hf_io.hf_config(c, max_positions))
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).train(False)  # inference mode (dropout off)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in hf.to_hf(params, c).items()}
    result = model.load_state_dict(state, strict=False)
    # A tied head has no tensor of its own in the export; anything else missing is a name-table mistake.
    missing = set(result.missing_keys) - ({"lm_head.weight"} if c.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise KslmError(f"the Hugging Face model does not take our tensors (missing {sorted(missing)}, "
                        f"unexpected {sorted(result.unexpected_keys)}); this is a bug in kslm_jax/model/hf_names.py")
    if c.tie_embeddings:
        model.tie_weights()
    return model


def _with_cache(model, n_layers: int):
    """The model as a function of flat tensors, which is what an ONNX graph's inputs and outputs are."""
    import torch
    import transformers

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, past):
            cache = transformers.DynamicCache(config=self.model.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return WithCache()


def write_onnx(params, c: llama.ModelConfig, tokenizer: Path, out: Path, external_over: int = EXTERNAL_OVER) -> Path:
    """`out`/model.onnx (+ model.onnx.data past `external_over` weight bytes) and tokenizer.model."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; a clear message beats its traceback)
        import torch
    except ImportError as e:
        raise KslmError(f"ONNX export needs {e.name}: pip install 'kslm_jax[export]'") from None
    weight_bytes = sum(np.asarray(a).nbytes for a in _leaves(params))
    wrapped = _with_cache(hf_model(params, c), c.n_layers)
    # Example sizes of 2 and 3: torch.export fixes any dimension traced at size 0 or 1 into the graph.
    batch, seq, past = 2, 3, 2
    example = (torch.zeros((batch, seq), dtype=torch.int64), torch.ones((batch, past + seq), dtype=torch.int64),
               tuple(torch.zeros((batch, c.n_kv_heads, past, c.head_dim)) for _ in range(2 * c.n_layers)))
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    shapes = ({0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in range(2 * c.n_layers)))
    with workdir_lib.atomic_dir(out) as tmp:
        path = tmp / "model.onnx"
        with _quiet(), torch.no_grad():
            torch.onnx.export(wrapped, example, str(path), dynamo=True, opset_version=OPSET, verbose=False,
                              input_names=[*INPUTS, *cache_names(c.n_layers)],
                              output_names=["logits", *cache_names(c.n_layers, "present")],
                              dynamic_shapes=shapes, external_data=weight_bytes > external_over)
        onnx.checker.check_model(str(path))  # by path: it then follows the external data file too
        shutil.copy(tokenizer, tmp / "tokenizer.model")
        write_marker(tmp, "onnx")
    return out


@contextlib.contextmanager
def _quiet():
    """Tracing chatter about transformers internals and torchvision (not installed, not used) is not about this
    model, so `kslm export` does not show it; an error still raises."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def export_onnx(workdir: Path, out: Path, external_over: int = EXTERNAL_OVER) -> Path:
    cfg = config_lib.read_workdir_config(workdir)
    arch.require_decoder(cfg, "kslm export --format onnx")
    tok_lib.check_workdir(cfg, workdir)
    params = finetune_io.restore_params_host(cfg, workdir)
    return write_onnx(params, llama.ModelConfig.from_config(cfg), workdir_lib.paths(workdir)["tokenizer"], out,
                      external_over)
