"""`kslm export --format onnx`: the decoder as a plain ONNX graph (opset 17, float32), built node by node.

Why by hand rather than torch.onnx.export of the HF model: the graph then depends only on `onnx` and our
own parameter tree (no torch tracing, whose output changes between torch versions), and every operator is
a core opset-17 one that any runtime implements. Input `input_ids` int64 [batch, seq], output `logits`
float32 [batch, seq, vocab]. Attention is causal without a padding mask: right-padded batches give the
same logits at the real positions. Weights are initializers, moved to `model.onnx.data` when the protobuf
would pass its 2 GB limit. The folder also holds tokenizer.model, so the graph can be fed without us.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import hf_names as hf
from kslm_jax.model import llama
from kslm_jax.objectives import finetune_io

OPSET = 17
# A ModelProto is one protobuf message (2 GiB at most); past this many weight bytes they go to a side file.
EXTERNAL_OVER = 2**31 - 2**26
DATA_FILE = "model.onnx.data"


class _Graph:
    """Collects nodes and initializers; each op call returns the name of its (first) output."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name: str, value) -> str:
        self.inits.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _rms_norm(g: _Graph, x: str, scale: str, eps: str) -> str:
    ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    return g.op("Mul", g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, eps)))), scale)


def _rope(g: _Graph, x: str, cos: str, sin: str, half: str, full: str, last: str, zero: str) -> str:
    """x * cos + rotate_half(x) * sin on the last axis, halves rotated as in model/llama.py."""
    x1 = g.op("Slice", x, zero, half, last)
    x2 = g.op("Slice", x, half, full, last)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def build(params, c: llama.ModelConfig):
    """The ModelProto of the decoder with `params` (our tree, float32 numpy) as initializers."""
    from onnx import TensorProto, helper
    g = _Graph()
    h, kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    groups = h // kv
    i64 = lambda name, v: g.const(name, np.asarray(v, np.int64))  # noqa: E731
    eps = g.const("eps", np.float32(c.norm_eps))
    last, zero, half, full = i64("axis_last", [-1]), i64("zero", [0]), i64("half", [hd // 2]), i64("full", [hd])
    q_shape = i64("q_shape", [0, 0, kv, groups, hd])       # (B, T, H*hd) -> (B, T, KV, G, hd)
    kv_shape = i64("kv_shape", [0, 0, kv, hd])
    merge_shape = i64("merge_shape", [0, 0, h * hd])
    masked = g.const("masked", np.float32(np.finfo(np.float32).min))  # as attention.reference fills
    scale = g.const("attn_scale", np.float32(hd ** -0.5))
    inv_freq = g.const("inv_freq", (1.0 / (c.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)))
                       .astype(np.float32))

    # Positions 0..T-1 from the input's shape: the angle table and the causal mask follow the sequence.
    seq = g.op("Reshape", g.op("Shape", "input_ids", start=1, end=2), i64("scalar_shape", np.zeros(0, np.int64)))
    pos = g.op("Range", i64("start", 0), seq, i64("step", 1))
    angles = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=TensorProto.FLOAT), last), inv_freq)
    angles = g.op("Concat", angles, angles, axis=-1)                       # (T, hd)
    cos, sin = g.op("Cos", angles), g.op("Sin", angles)
    future = g.op("Greater", g.op("Unsqueeze", pos, zero), g.op("Unsqueeze", pos, last))  # key after query

    embed = g.const("embed_tokens", params["embed_tokens"]["embedding"])
    x = g.op("Gather", embed, "input_ids", axis=0)
    for i, layer in enumerate(hf._layers(params, c)):
        attn, mlp = layer["self_attn"], layer["mlp"]
        w = {name: g.const(f"layers.{i}.{name}", np.asarray(attn[name]["kernel"]).reshape(c.d_model, -1))
             for name in ("q_proj", "k_proj", "v_proj")}
        y = _rms_norm(g, x, g.const(f"layers.{i}.input_layernorm", layer["input_layernorm"]["scale"]), eps)
        # queries grouped under their key/value head: (B, KV, G, T, hd); keys and values (B, KV, 1, T, hd)
        q = g.op("Transpose", g.op("Reshape", g.op("MatMul", y, w["q_proj"]), q_shape), perm=[0, 2, 3, 1, 4])
        k = g.op("Transpose", g.op("Reshape", g.op("MatMul", y, w["k_proj"]), kv_shape), perm=[0, 2, 1, 3])
        v = g.op("Transpose", g.op("Reshape", g.op("MatMul", y, w["v_proj"]), kv_shape), perm=[0, 2, 1, 3])
        q = _rope(g, q, cos, sin, half, full, last, zero)
        k = g.op("Unsqueeze", _rope(g, k, cos, sin, half, full, last, zero), i64(f"layers.{i}.group_axis", [2]))
        v = g.op("Unsqueeze", v, f"layers.{i}.group_axis")
        scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 2, 4, 3])), scale)
        probs = g.op("Softmax", g.op("Where", future, masked, scores), axis=-1)
        out = g.op("Reshape", g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 3, 1, 2, 4]), merge_shape)
        o = g.const(f"layers.{i}.o_proj", np.asarray(attn["o_proj"]["kernel"]).reshape(h * hd, c.d_model))
        x = g.op("Add", x, g.op("MatMul", out, o))
        y = _rms_norm(g, x, g.const(f"layers.{i}.post_attention_layernorm",
                                    layer["post_attention_layernorm"]["scale"]), eps)
        gate = g.op("MatMul", y, g.const(f"layers.{i}.gate_proj", mlp["gate_proj"]["kernel"]))
        up = g.op("MatMul", y, g.const(f"layers.{i}.up_proj", mlp["up_proj"]["kernel"]))
        hidden = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, g.op("MatMul", hidden, g.const(f"layers.{i}.down_proj", mlp["down_proj"]["kernel"])))
    x = _rms_norm(g, x, g.const("norm", params["norm"]["scale"]), eps)
    if c.tie_embeddings:
        # Gemm reads the embedding table transposed in place: one copy of the tied matrix, in the file and in memory.
        rows = g.op("Reshape", x, i64("rows_shape", [-1, c.d_model]))
        flat = g.op("Gemm", rows, embed, transB=1)
        out_shape = g.op("Concat", g.op("Shape", "input_ids"), i64("vocab_dim", [c.vocab_size]), axis=0)
        logits = g.op("Reshape", flat, out_shape)
    else:
        logits = g.op("MatMul", x, g.const("lm_head", params["lm_head"]["kernel"]))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    graph = helper.make_graph(
        g.nodes, "kslm_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])],
        initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kslm_jax")


def write_onnx(params, c: llama.ModelConfig, tokenizer: Path, out: Path, external_over: int = EXTERNAL_OVER) -> Path:
    """`out`/model.onnx (+ model.onnx.data past `external_over` weight bytes) and tokenizer.model."""
    try:
        import onnx
    except ImportError:
        raise KslmError("ONNX export needs the onnx package: pip install 'kslm_jax[export]'") from None
    weight_bytes = sum(np.asarray(a).nbytes for a in _leaves(params))
    model = build(params, c)
    with workdir_lib.atomic_dir(out) as tmp:
        path = tmp / "model.onnx"
        if weight_bytes > external_over:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
        onnx.checker.check_model(str(path))  # by path: it then follows the external data file too
        shutil.copy(tokenizer, tmp / "tokenizer.model")
    return out


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def export_onnx(workdir: Path, out: Path, external_over: int = EXTERNAL_OVER) -> Path:
    cfg = config_lib.read_workdir_config(workdir)
    tok_lib.check_workdir(cfg, workdir)
    params = finetune_io.restore_params_host(cfg, workdir)
    return write_onnx(params, llama.ModelConfig.from_config(cfg), workdir_lib.paths(workdir)["tokenizer"], out,
                      external_over)
