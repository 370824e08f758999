"""The step watchdog ends a hung run with exit code 3; each sharding preset shards every parameter as declared."""
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import cpu_env

from kslm_jax.core import config as config_lib
from kslm_jax.core import sharding
from kslm_jax.model import llama
from kslm_jax.train import optim
from kslm_jax.train import state as state_lib

REPO = Path(__file__).resolve().parents[1]


def test_watchdog_exits_3_naming_the_stalled_step(workdir):
    env = cpu_env.one_device_env(KSLM_FAULT_STALL_AT_STEP="4")
    proc = subprocess.run([sys.executable, "-m", "kslm_jax", "train", "--workdir", str(workdir),
                           "--config.train.step_timeout_s=3", "--config.train.steps=10"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "watchdog: step 4 stalled" in proc.stderr


# (preset, mesh) → expected PartitionSpec of a few parameters, by path
EXPECTED = {
    "dp": {"q_proj": (None, None, None, None), "gate_proj": (None, None, None), "embedding": (None, None)},
    "fsdp": {"q_proj": (None, "fsdp", None, None), "gate_proj": (None, "fsdp", None), "embedding": (None, "fsdp")},
    "fsdp_tp": {"q_proj": (None, "fsdp", "tensor", None), "gate_proj": (None, "fsdp", "tensor"),
                "embedding": ("tensor", "fsdp")},
}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_parameter_follows_its_preset(preset, capsys):
    cfg = config_lib.base_config()
    for item in ("model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                 "tokenizer.vocab_size=1000", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"mesh.rules={preset}"):
        config_lib.apply_override(cfg, item)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules(cfg.mesh.rules)
    model = llama.Transformer(llama.ModelConfig.from_config(cfg))
    tx, _ = optim.make(cfg.optim, 10)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, 0, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(shardings.params)[0]
    print(f"\n{preset}:")
    for path, s in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        print(f"  {name:55s} {s.spec}")
        for key, want in EXPECTED[preset].items():
            if name.endswith(f"{key}/kernel") or name.endswith(key):
                assert tuple(s.spec) + (None,) * (len(want) - len(s.spec)) == want, (name, s.spec)
        if preset == "dp":
            assert all(a is None for a in s.spec), name
    # The optimizer's moments follow their parameters.
    mu = shardings.opt_state[1][0].mu if isinstance(shardings.opt_state, tuple) else None
    if mu is not None:
        assert mu["layers"]["mlp"]["gate_proj"]["kernel"].spec == shardings.params["layers"]["mlp"]["gate_proj"]["kernel"].spec
    assert "layers/mlp/gate_proj/kernel" in capsys.readouterr().out


def test_multislice_mesh_needs_slice_devices():
    from kslm_jax.core.errors import KslmError
    cfg = config_lib.base_config()
    for item in ("mesh.data=2", "mesh.slices=2"):
        config_lib.apply_override(cfg, item)
    with pytest.raises(KslmError, match="slice_index"):
        sharding.make_mesh(cfg.mesh, jax.devices()[:2])
    config_lib.apply_override(cfg, "mesh.slices=3")
    with pytest.raises(KslmError, match="multiple of mesh.slices"):
        sharding.make_mesh(cfg.mesh, jax.devices()[:2])
