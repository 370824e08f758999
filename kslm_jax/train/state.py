"""TrainState: everything the step changes, as one pytree that the checkpoint saves whole."""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kslm_jax.core import sharding
from kslm_jax.model import llama


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _dummy(batch: int = 1, seq: int = 8):
    return jnp.zeros((batch, seq), jnp.int32)


def init_fn(model: llama.Transformer, tx: optax.GradientTransformation, seed: int):
    def init():
        rng = jax.random.PRNGKey(seed)
        params = model.init(jax.random.fold_in(rng, 0), _dummy())["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.fold_in(rng, 1))
    return init


def abstract_and_shardings(model, tx, seed: int, mesh, rules=sharding.RULES):
    """Shapes and NamedShardings of the state, from logical axis names, without allocating anything."""
    init = init_fn(model, tx, seed)
    boxed = jax.eval_shape(init)
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    return abstract, shardings


def create(model, tx, seed: int, mesh, shardings, rules=sharding.RULES):
    """Initialize directly into its shardings: full-size parameters never exist on one device."""
    init = init_fn(model, tx, seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
