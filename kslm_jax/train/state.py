"""TrainState: everything the step changes, as one pytree that the checkpoint saves whole."""
from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kslm_jax.core import sharding
from kslm_jax.model import fp8, llama


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    # model.matmul_precision=fp8_delayed's scales and amax histories (collection fp8.META), which the step
    # overwrites with their new values; empty otherwise, so every other run's state has no extra leaves.
    fp8_meta: dict = dataclasses.field(default_factory=dict)


def _dummy(batch: int = 1, seq: int = 8):
    return jnp.zeros((batch, seq), jnp.int32)


def _layer(leaf, i: int):
    """Layer i of a leaf the scanned stack stacked on axis 0, with the "layers" axis name dropped."""
    if isinstance(leaf, nn.Partitioned):
        return leaf.replace(value=leaf.value[i], names=leaf.names[1:])
    return leaf[i]


def _unstack(tree: dict, n: int) -> dict:
    """A scanned stack's variables with its "layers" entry split into layers_0..layers_{n-1}."""
    if "layers" not in tree:
        return tree
    tree = dict(tree)
    stacked = tree.pop("layers")
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for i in range(n):
        tree[f"layers_{i}"] = jax.tree.map(lambda leaf: _layer(leaf, i), stacked, is_leaf=is_box)
    return tree


def _init_variables(model, key):
    """(parameters, FP8 meta) of `model`; the meta is empty unless model.matmul_precision=fp8_delayed.
    An unrolled decoder is initialized through its scanned twin, then split into layers_0..layers_{n-1}:
    the twin's program draws one layer's random numbers in a loop, where the unrolled model's program holds a
    separate threefry expansion for every leaf of every layer. That program took over 70 s to compile on an
    H100 at 124M, against 12 s for the train step itself; through the twin the whole init takes 3.5 s there
    (benchmarks/init_time.py). For one seed, both layouts start from the same weights."""
    if not isinstance(model, llama.Transformer) or model.c.n_layers < 2:
        variables = model.init(key, _dummy())
        return variables["params"], variables.get(fp8.META, {})
    # scan_unroll=1 too: an unrolled scan body copies its draws as well (124M at scan_unroll=12 on an H100:
    # setup 31.6 s before, 3.1 s after), and unrolling does not change which weights are drawn.
    twin = llama.Transformer(dataclasses.replace(model.c, scan_layers=True, scan_unroll=1))
    variables = twin.init(key, _dummy())
    params, meta = variables["params"], variables.get(fp8.META, {})
    if model.c.scan_layers:
        return params, meta
    return _unstack(params, model.c.n_layers), _unstack(meta, model.c.n_layers)


def init_fn(model: llama.Transformer, tx: optax.GradientTransformation, seed: int):
    def init():
        rng = jax.random.PRNGKey(seed)
        params, meta = _init_variables(model, jax.random.fold_in(rng, 0))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.fold_in(rng, 1), fp8_meta=meta)
    return init


def fresh_fp8_meta(model, mesh, shardings, rules=sharding.RULES) -> dict:
    """The FP8 meta a run starts from, for a state whose weights come from elsewhere (kslm import, kslm prune):
    Flax's constants, unit scales and empty histories; {} unless model.matmul_precision=fp8_delayed. The
    parameters drawn beside it are never used, so XLA drops them from the program."""
    if model.c.matmul_precision != "fp8_delayed":
        return {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda: _init_variables(model, jax.random.PRNGKey(0))[1], out_shardings=shardings.fp8_meta)()


def abstract_and_shardings(model, tx, seed: int, mesh, rules=sharding.RULES):
    """Shapes and NamedShardings of the state, from logical axis names, without allocating anything."""
    init = init_fn(model, tx, seed)
    boxed = jax.eval_shape(init)
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return abstract, shardings


def jitted_init(model, tx, seed: int, shardings):
    """The jitted initializer that `create` runs, to call under the mesh and logical axis rules
    (benchmarks/init_time.py times its lowering, compile and run)."""
    init = init_fn(model, tx, seed)
    return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)


def create(model, tx, seed: int, mesh, shardings, rules=sharding.RULES):
    """Initialize directly into its shardings: full-size parameters never exist on one device."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted_init(model, tx, seed, shardings)()
