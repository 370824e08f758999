"""`kslm compile` on this CPU machine: the real train step compiled by the TPU compiler (libtpu, the `tpu` extra)
for a topology we do not have; the fit verdict, FLOP accounting and the one-line refusal.

Topology names are parsed without libtpu; everything that compiles skips on an install without the extra.
`kslm compile` runs in the test process (tests/cli_inproc.py): the topology's devices come from libtpu, not from
the process's CPU devices, so a subprocess would compile the same program after two seconds of imports.
"""
import json

import pytest
from cli_inproc import kslm

from kslm_jax.core import config as config_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.train import topology

# The tiny recipe (scanned layers) with the reference attention, so every matmul is in the compiled program.
# hlo_cost weights the layer loop by its trip count; measured: compiled matmuls / analytic = 0.999 (the analytic
# count also has 6 x the norm scales, which are no matmul). XLA's own cost_analysis counts the loop body once.
FLOPS_TOLERANCE = 0.01


def _needs_libtpu():
    pytest.importorskip("libtpu", reason="needs the `tpu` extra: pip install -e '.[tpu]'")


@pytest.mark.parametrize("name, jax_name, chips, per_host, hosts", [
    ("v5e-16", "v5e:4x4", 16, 4, 4), ("v5litepod-16", "v5e:4x4", 16, 4, 4), ("v5e-4", "v5e:2x2", 4, 4, 1),
    ("v5e-256", "v5e:16x16", 256, 4, 64), ("v4-32", "v4:2x2x4", 16, 4, 4), ("v5p-128", "v5p:4x4x4", 64, 4, 16),
    ("v6e-64", "v6e:8x8", 64, 4, 16), ("v6e-8", "v6e:2x4", 8, 8, 1)])
def test_topology_names_parse(name, jax_name, chips, per_host, hosts):
    t = topology.parse(name)
    assert (t.jax_name, t.chips, t.chips_per_host, t.hosts) == (jax_name, chips, per_host, hosts)


@pytest.mark.parametrize("bad, words", [("v7x-8", "not a TPU accelerator type"), ("v5e", "not a TPU accelerator"),
                                        ("v5p-6", "not a v5p slice"), ("v5e-24", "not a v5e slice"),
                                        ("v5e-512", "not a v5e slice"), ("tpu-16", "not a TPU accelerator")])
def test_bad_topology_names_are_refused(bad, words):
    with pytest.raises(KslmError, match=words):
        topology.parse(bad)


def test_two_slices_double_the_hosts():
    t = topology.parse("v5e-256", slices=2)
    assert (t.devices_total, t.hosts) == (512, 128)


def _kslm(tmp_path, *args):
    return kslm("compile", "--config", "configs/tiny_ko.py", "--workdir", tmp_path, *args)


def test_tiny_compiles_for_v5e_2x2_and_flops_match_the_analytic_count(tmp_path):
    _needs_libtpu()
    from kslm_jax.train import aot
    cfg = config_lib.load("configs/tiny_ko.py", ["mesh.fsdp=2", "model.attention=xla"])
    assert cfg.model.scan_layers and cfg.model.n_layers == 4
    r = aot.compile_report(cfg, topology.parse("v5e-4"))
    assert r["fits"] and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    m = r["memory_per_chip"]
    assert 0 < m["arguments"] and 0 < m["total"] < m["hbm"] and m["headroom"] == m["hbm"] - m["total"]
    assert r["loops_counted_once"] == 0 and r["flops_per_chip_kernels"] == 0
    assert r["flops_per_chip_compiled"] == pytest.approx(r["flops_per_chip_analytic"], rel=FLOPS_TOLERANCE)
    assert r["flops_per_chip_compiled"] * r["topology"]["chips"] == pytest.approx(r["flops_per_step_analytic"],
                                                                                   rel=FLOPS_TOLERANCE)
    assert r["flops_per_chip_xla"] < 0.6 * r["flops_per_chip_compiled"]   # the 4-layer body counted once
    # fsdp shards parameters: they are gathered for the matmuls and their gradients reduced
    assert r["collectives_per_chip"]["all-gather"]["count"] > 0
    rf = r["roofline"]
    assert rf["estimate"] and "warning" not in rf and 0 < rf["mfu_serial"] <= rf["mfu_overlap"] <= 1


def test_kslm_compile_splash_writes_compile_json(tmp_path):
    _needs_libtpu()
    out = _kslm(tmp_path, "--topology", "v5e-4", "--config.mesh.fsdp=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attention=splash" in out.stdout and "ESTIMATE" in out.stdout and "not a TPU run" in out.stdout
    report = json.loads((tmp_path / "compile.json").read_text())
    assert report["attention"] == "splash" and report["fits"] is True
    # Splash is opaque to the compiled count: its analytic share completes it
    executed = report["flops_per_chip_compiled"] + report["flops_per_chip_kernels"]
    assert executed == pytest.approx(report["flops_per_chip_analytic"], rel=FLOPS_TOLERANCE)
    assert "warning" not in report["roofline"]
    assert report["topology"] == {"name": "v5e-4", "jax": "v5e:2x2", "slices": 1, "chips": 4, "chips_per_host": 4,
                                  "hosts": 1}


def test_oversized_config_is_refused_in_one_line_naming_the_lever(tmp_path):
    _needs_libtpu()
    out = _kslm(tmp_path, "--topology", "v5e-4", "--config.train.batch_size=65536")
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("kslm: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "does not fit" in errors[0] and "set model.remat=dots" in errors[0]
    assert json.loads((tmp_path / "compile.json").read_text())["fits"] is False


def test_two_slices_put_data_across_slices_and_fsdp_inside():
    _needs_libtpu()
    from kslm_jax.train import aot
    cfg = config_lib.load("configs/tiny_ko.py", ["mesh.data=2", "mesh.fsdp=-1", "mesh.slices=2"])
    _, mesh, _, _ = aot.lower(cfg, topology.parse("v5e-4", slices=2))   # lowering only: no compile
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):   # each `data` index is one whole slice: fsdp collectives never cross the DCN
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(KslmError, match="mesh.slices"):
        aot.lower(config_lib.load("configs/tiny_ko.py", ["mesh.fsdp=-1", "mesh.data=1"]),
                  topology.parse("v5e-4", slices=2))


def test_tensor_parallel_mesh_splits_a_torus_axis_where_jax_would_refuse():
    _needs_libtpu()
    from kslm_jax.core import sharding
    cfg = config_lib.load("configs/tiny_ko.py", ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=4"])
    devices = topology.devices(topology.parse("v6e-64"))   # an 8x8 torus: tensor=4 needs half of one side
    mesh = sharding.make_mesh(cfg.mesh, devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    for row in mesh.devices.reshape(16, 4):   # each tensor group: 4 neighbouring chips in one torus line
        coords = [d.coords for d in row]
        assert len({c[0] for c in coords}) == 1 or len({c[1] for c in coords}) == 1
