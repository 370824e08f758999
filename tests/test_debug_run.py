"""Debugging a run: a profiler trace of chosen steps, NaN provenance, the OOM report, `kslm inspect`."""
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_inproc import kslm
from conftest import TINY, random_params

from kslm_jax.cli import commands
from kslm_jax.cli import compile as compile_cmd
from kslm_jax.cli import main as cli_main
from kslm_jax.core import checkpoint, sharding
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.model import llama
from kslm_jax.objectives import lm
from kslm_jax.train import debug_nans, layout, oom, profiler
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib


def _xplane_steps(path: Path) -> set[int]:
    """Step numbers of the "train" step annotations in an XSpace file, read with jax's own profile reader."""
    data = jax.profiler.ProfileData.from_file(str(path))
    steps = set()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name == profiler.STEP_NAME:
                    steps.update(int(v) for k, v in event.stats if k == "step_num")
    return steps


def test_train_profile_flag_sets_logging_profile_steps(workdir, monkeypatch):
    seen = []

    def stop_before_training(cfg, wd):
        seen.append(cfg.logging.profile_steps)
        raise KslmError("stopped")
    monkeypatch.setattr(commands.lm, "trainer", stop_before_training)
    args = cli_main._parser("train").parse_args(["--workdir", str(workdir), "--profile", "2:3", "--force"])
    with pytest.raises(KslmError, match="stopped"):
        commands.train(args, [])
    assert seen == ["2:3"] and workdir_lib.config_for(workdir, None, []).logging.profile_steps == "2:3"


def test_profile_traces_the_chosen_steps_into_tensorboard(workdir):
    cfg = workdir_lib.config_for(workdir, None, ["train.steps=4", "train.eval_batches=1",
                                                 "logging.profile_steps=2:3"], force=True)
    lm.trainer(cfg, workdir).fit()
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert _xplane_steps(traces[0]) == {2, 3}


def test_only_process_0_traces_unless_every_host_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert not profiler.StepProfiler(tmp_path, "2:3").enabled
    assert profiler.StepProfiler(tmp_path, "2:3", all_hosts=True).enabled
    assert not profiler.StepProfiler(tmp_path, "", all_hosts=True).enabled


@pytest.mark.parametrize("bad", ["3", "0:2", "5:4", "a:b"])
def test_bad_profile_steps_are_refused(workdir, bad):
    with pytest.raises(KslmError, match="logging.profile_steps"):
        workdir_lib.config_for(workdir, None, [f"logging.profile_steps={bad}"], force=True)


def test_debug_nans_stops_at_the_first_nan_step_naming_the_scanned_layer_and_saves_the_last_good_state(workdir):
    cfg = workdir_lib.config_for(workdir, None, ["train.steps=5", "train.debug_nans=true"], force=True)
    trainer = lm.trainer(cfg, workdir)
    trainer.init_fresh()
    params = trainer.state.params
    kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]  # scanned: the first axis is the layer
    params["layers"]["self_attn"]["q_proj"]["kernel"] = kernel.at[1, 3, 1, 0].set(jnp.nan)
    trainer.state = trainer.state.replace(params=params)
    injected = jax.tree.map(np.asarray, params)  # the step donates the state's buffers
    with pytest.raises(KslmError) as e:
        trainer.fit()
    msg = str(e.value)
    # the stack is sliced for layer 1 before that layer's modules run, so the slice makes the first NaN
    assert "the first NaN came from `slice` in layers_1 at kslm_jax/model/llama.py" in msg and "forward pass" in msg
    assert "layers/self_attn/q_proj/kernel (1 of 8192 values, first at [1, 3, 1, 0])" in msg
    assert "the run stopped at step 1 with its last good state saved" in msg
    with jax.set_mesh(trainer.mesh):
        step, saved = checkpoint.restore_params(trainer.paths["checkpoints"], trainer.abstract)
    assert step == 1
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(injected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_debug_nans_names_the_operation_and_module_path_in_unrolled_layers():
    # The suite's TINY shapes, as in the scanned test above: the op-by-op re-run compiles each operation once per
    # shape, and most of this one's operations are then already compiled.
    cfg = config_lib.load("tiny_ko", TINY)
    c = dataclasses.replace(llama.ModelConfig.from_config(cfg), scan_layers=False)
    rows, seq = cfg.train.batch_size, cfg.data.seq_len
    model, params = random_params(c)
    params["layers_1"]["self_attn"]["q_proj"]["kernel"][3, 1, 0] = np.nan
    params = jax.tree.map(jnp.asarray, params)
    tx = optax.sgd(0.1)
    state = state_lib.TrainState(step=jnp.int32(1), params=params, opt_state=tx.init(params),
                                 rng=jax.random.PRNGKey(0))
    tokens = jnp.ones((rows, seq), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens,
             "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))}
    mesh = sharding.make_mesh(SimpleNamespace(data=1, fsdp=1, tensor=1, slices=1))
    trainer = SimpleNamespace(state=state, mesh=mesh, extra=None, tx=tx, lr_fn=lambda count: 0.1,
                              rules=sharding.RULES, cfg=SimpleNamespace(train=SimpleNamespace(grad_accum=1)),
                              objective=SimpleNamespace(loss=step_lib.lm_loss(model, 1e-4)))
    found = debug_nans.explain(trainer, batch, 1)
    assert (found.op, found.kind, found.module, found.phase) == (
        "convert_element_type", "nan", "layers_1/self_attn/q_proj", "forward pass")
    assert found.source.startswith("kslm_jax/model/llama.py:") and found.source.endswith("(Linear.__call__)")
    assert found.bad_params == ["layers_1/self_attn/q_proj/kernel (1 of 4096 values, first at [3, 1, 0])"]


def test_out_of_memory_ends_kslm_train_with_exit_code_4_and_one_paragraph(workdir, monkeypatch):
    monkeypatch.setenv("KSLM_FAULT_OOM", "1:compile")
    out = kslm("train", "--workdir", workdir, "--config.train.steps=2", "--config.train.eval_batches=1")
    assert out.returncode == oom.EXIT_CODE, out.stderr[-2000:]
    line = [x for x in out.stderr.splitlines() if x.startswith("kslm: error:")]
    assert len(line) == 1 and out.stderr.rstrip().endswith(line[0])
    assert "out of device memory at compile time in step 1 on 1 x cpu" in line[0]
    assert "the compiler needs 20.50 GiB per device of the 15.48 GiB it has" in line[0]
    assert line[0].endswith("--config.model.remat=dots, then run the same command to resume from the last checkpoint")
    assert not (workdir / "memory").exists()  # no memory profile for a program that never ran


def test_out_of_memory_at_run_time_reports_the_compiled_step_and_saves_the_memory_profile(workdir, monkeypatch):
    monkeypatch.setenv("KSLM_FAULT_OOM", "2")
    cfg = workdir_lib.config_for(workdir, None, ["train.steps=3"], force=True)
    with pytest.raises(oom.OutOfMemory) as e:
        lm.trainer(cfg, workdir).fit()
    msg = str(e.value)
    assert "out of device memory at run time in step 2 on 1 x cpu" in msg
    assert re.search(r"the compiled step needs [\d.]+ [KMG]iB per device \(arguments [\d.]+ [KMG]iB, outputs", msg)
    assert "the largest state buffers per device: params/" in msg
    assert "to fit, recompute activations in the backward pass instead of storing them: --config.model.remat=dots" \
        in msg
    profile = workdir / "memory" / "oom_step2.prof"
    assert f"device memory profile: {profile}" in msg and profile.stat().st_size > 0


@pytest.mark.parametrize("mesh, remat, batch, accum, state_gib, want", [
    ({"data": 4, "fsdp": 2}, "none", 32, 1, 50.0, "--config.mesh.fsdp=8 --config.mesh.data=1"),
    ({"data": 1, "fsdp": 8}, "none", 32, 1, 50.0, "--config.model.remat=dots"),
    ({"data": 8, "fsdp": 1}, "dots", 32, 2, 1.0, "--config.train.grad_accum=4"),
    ({"data": 8, "fsdp": 1}, "dots", 16, 2, 1.0, "--config.model.remat=full"),
    ({"data": 8, "fsdp": 1}, "full", 16, 2, 1.0, "--config.train.batch_size=8"),
])
def test_the_oom_lever_names_an_exact_override(mesh, remat, batch, accum, state_gib, want):
    cfg = SimpleNamespace(mesh=SimpleNamespace(rules="fsdp_tp"), model=SimpleNamespace(remat=remat),
                          train=SimpleNamespace(batch_size=batch, grad_accum=accum))
    assert oom.lever(cfg, mesh, state_gib * oom.GiB, 80 * oom.GiB).endswith(want)


@pytest.mark.parametrize("platform, env, named", [
    ("gpu", {}, True),
    ("gpu", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, False),
    ("gpu", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, False),
    ("cpu", {}, False),
    ("tpu", {}, False),
])
def test_the_oom_paragraph_names_the_gpu_allocators_share_only_when_it_applies(platform, env, named):
    note = oom.allocator_note(SimpleNamespace(platform=platform), env)
    assert (note is not None) == named
    assert note is None or "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95" in note


@pytest.mark.parametrize("mesh, rules", [((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")])
def test_inspect_reports_shardings_bytes_and_the_compiled_step_on_8_devices(prepared, mesh, rules, capsys,
                                                                            monkeypatch):
    data, fsdp, tensor = mesh
    over = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.rules={rules}"]
    reports, real = [], layout.report
    monkeypatch.setattr(layout, "report", lambda cfg: reports.append(real(cfg)) or reports[-1])
    args = cli_main._parser("inspect").parse_args(["--workdir", str(prepared)])
    assert commands.inspect(args, over) == 0
    printed = capsys.readouterr().out
    r = reports[0]
    cfg = compile_cmd.load_config(None, str(prepared), over)
    assert r["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor} and r["devices"] == 8
    rows = {p["name"]: p for p in r["params"]}
    q = rows["layers/self_attn/q_proj/kernel"]
    assert q["spec"] == ("P(None, 'fsdp', None, None)" if rules == "fsdp" else "P(None, 'fsdp', 'tensor', None)")
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for p in r["params"]:  # each parameter's bytes on one device: its whole size over the devices it is split over
        split = np.prod([sizes[a] for a in p["spec"][2:-1].replace("'", "").split(", ") if a in sizes])
        assert p["per_device_bytes"] * split == p["count"] * 4, p
        assert f"{p['name']} " in printed and p["spec"] in printed
    if tensor > 1:  # the real state, made on this mesh, holds exactly these bytes on a device
        state = lm.trainer(cfg, prepared).objective.init_state()
        for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
            name = "/".join(str(k.key) for k in path)
            assert x.addressable_shards[0].data.nbytes == rows[name]["per_device_bytes"]
    d, m = r["per_device"], r["memory_per_device"]
    assert d["params"] == d["grads"] == sum(p["per_device_bytes"] for p in r["params"])
    assert d["opt_state"] >= 2 * d["params"]  # AdamW's two moments
    assert m["arguments"] >= d["params"] + d["opt_state"] and m["temporaries"] > 0
    assert r["flops_per_device_compiled"] > 0 and r["param_count"] == sum(p["count"] for p in r["params"])
    assert [x["module"] for x in r["modules"]][:2] == ["embed_tokens", "layers"]
    assert "compiled train step per device: arguments" in printed and "flops: compiled" in printed
