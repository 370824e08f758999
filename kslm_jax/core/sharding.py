"""Mesh construction and the logical-axis rules: the only module that names mesh axes.

Parameters shard their `embed` dimension over `fsdp` and their head/mlp/vocab dimensions over `tensor`;
activations shard `batch` over (`data`, `fsdp`) and their head/mlp/vocab dimensions over `tensor`.
`seq` and `head_dim` stay whole, as cuDNN attention requires.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kslm_jax.core.errors import KslmError

AXES = ("data", "fsdp", "tensor")

_ACTIVATIONS = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Parameter rules per preset; activations are always batch-sharded over (data, fsdp).
PRESETS = {
    # every parameter whole on every device (plain data parallel)
    "dp": (("embed", None), ("vocab", None), ("mlp", None), ("heads", None), ("kv_heads", None),
           ("head_dim", None), ("layers", None)),
    # parameters and optimizer state split along `embed` over fsdp (ZeRO-3 style), gathered per layer
    "fsdp": (("embed", "fsdp"), ("vocab", None), ("mlp", None), ("heads", None), ("kv_heads", None),
             ("head_dim", None), ("layers", None)),
    # fsdp plus Megatron-style tensor parallelism over heads, MLP channels and vocabulary
    "fsdp_tp": (("embed", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("head_dim", None), ("layers", None)),
}


def rules(preset: str = "fsdp_tp") -> tuple:
    if preset not in PRESETS:
        raise KslmError(f"config key mesh.rules={preset!r} is not one of {', '.join(PRESETS)}")
    acts = _ACTIVATIONS if preset == "fsdp_tp" else tuple((k, None) if k.startswith("act_") else (k, v)
                                                          for k, v in _ACTIVATIONS)
    return PRESETS[preset] + acts


RULES = rules("fsdp_tp")


def mesh_shape(mcfg, n_devices: int) -> tuple[int, int, int]:
    dims = [mcfg.data, mcfg.fsdp, mcfg.tensor]
    fixed = math.prod(d for d in dims if d != -1)
    if dims.count(-1) > 1:
        raise KslmError("only one of mesh.data/fsdp/tensor may be -1")
    if -1 in dims:
        if n_devices % fixed:
            raise KslmError(f"mesh {dims}: {n_devices} devices do not divide by {fixed}")
        dims[dims.index(-1)] = n_devices // fixed
    if any(d < 1 for d in dims) or math.prod(dims) > n_devices:
        raise KslmError(f"mesh (data, fsdp, tensor)={tuple(dims)} needs {math.prod(dims)} devices; "
                        f"{n_devices} are available")
    return tuple(dims)


def make_mesh(mcfg, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mcfg, len(devices))
    used = devices[: math.prod(shape)]
    # Auto axes: Flax Linen's logical constraints need them (with Explicit axes they become assertions).
    auto = (AxisType.Auto,) * 3
    if mcfg.slices > 1:
        return _multislice_mesh(shape, mcfg.slices, used, auto)
    # jax.make_mesh lets a mesh axis split a physical torus axis only on v5e, so mesh.tensor=4 on a v6e 8x8 fails
    # there. create_device_mesh (what make_mesh calls) splits only where no whole-axis layout exists, so this
    # gives make_mesh's mesh wherever make_mesh has one, and a contiguous split elsewhere.
    grid = mesh_utils.create_device_mesh(shape, used, allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, AXES, axis_types=auto)


def _multislice_mesh(shape, slices: int, devices, axis_types) -> jax.sharding.Mesh:
    """Multi-slice TPU: `data` spans slices over the data-center network; fsdp and tensor stay inside a
    slice, on the fast interconnect, where their collectives run every layer."""
    if shape[0] % slices:
        raise KslmError(f"mesh.data={shape[0]} must be a multiple of mesh.slices={slices}")
    if not all(hasattr(d, "slice_index") for d in devices):
        raise KslmError(f"mesh.slices={slices} needs multi-slice TPU devices (they report slice_index); "
                        f"these are {devices[0].platform} devices: use mesh.slices=1")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1], shape[2]), (slices, 1, 1),
                                                devices=devices)
    return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)


def logical_to_sharding(logical_tree, mesh, rules_=RULES):
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules_)


def batch_sharding(mesh, ndim: int = 2, accum: bool = False) -> NamedSharding:
    spec = (None, ("data", "fsdp")) if accum else (("data", "fsdp"),)
    return NamedSharding(mesh, P(*spec, *([None] * (ndim - len(spec)))))


def attention_specs(mesh, batch: int, kv_heads: int) -> tuple[P, P]:
    """shard_map specs for a kernel on q/k/v (B, T, heads, H) and segment ids (B, T): rows over data and fsdp,
    heads over tensor; an axis that does not divide its dimension stays whole."""
    rows = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    if batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()
    heads = "tensor" if mesh.shape["tensor"] > 1 and kv_heads % mesh.shape["tensor"] == 0 else None
    rows = rows or None
    return P(rows, None, heads, None), P(rows, None)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, mesh, accum: int) -> dict:
    """Host numpy batch (this process's rows) → global jax arrays sharded over data and fsdp."""
    out = {}
    for k, v in local.items():
        if accum > 1:
            v = v.reshape(accum, v.shape[0] // accum, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, accum > 1), np.asarray(v))
    return out
