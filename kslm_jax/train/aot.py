"""Ahead-of-time compilation of the real train step for a TPU topology this host does not own.

The mesh is built on the topology's devices, the state exists only as shapes and shardings, and the step is
step.jit_train_step, the function `kslm train` runs, with the configured batch, accumulation and remat.
What comes back is the compiler's own accounting (memory, FLOPs, collectives) plus a roofline estimate.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from kslm_jax.core import sharding
from kslm_jax.core.errors import KslmError
from kslm_jax.model import llama
from kslm_jax.train import hlo_cost, optim
from kslm_jax.train import state as state_lib
from kslm_jax.train import step as step_lib
from kslm_jax.train import topology as topo_lib

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids")
# The compiler's out-of-memory refusals: "Ran out of memory on HBM, the total memory required for HLO temporaries
# (170.81G) exceeds available HBM (15.75G)" and "Used 20.5G of 15.75G hbm. Exceeded hbm capacity by 4.75G."
_OOM = (re.compile(r"required for .*?\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))


class DoesNotFit(KslmError):
    """The config needs more HBM per chip than the topology has; the message names the lever."""


def model_config(cfg) -> llama.ModelConfig:
    """The model as it would run on a TPU: attention="auto" becomes Splash."""
    mc = llama.ModelConfig.from_config(cfg)
    return dataclasses.replace(mc, attention="splash") if cfg.model.attention == "auto" else mc


def _abstract_batch(cfg, mesh):
    b, t, accum = cfg.train.batch_size, cfg.data.seq_len, cfg.train.grad_accum
    shape = (accum, b // accum, t) if accum > 1 else (b, t)
    spec = sharding.batch_sharding(mesh, len(shape), accum > 1)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec) for k in BATCH_KEYS}


def lower(cfg, topo: topo_lib.Topology):
    """(jax Lowered, mesh, ModelConfig, abstract state) for the configured step on the topology's devices."""
    devices = topo_lib.devices(topo)
    mcfg = cfg.mesh
    if topo.slices != mcfg.slices:
        raise KslmError(f"--slices {topo.slices} but mesh.slices={mcfg.slices}: set --config.mesh.slices="
                        f"{topo.slices} (mesh.data then spans the slices)")
    mesh = sharding.make_mesh(mcfg, devices)
    if mesh.size != len(devices):
        raise KslmError(f"mesh (data, fsdp, tensor)={tuple(mesh.shape.values())} uses {mesh.size} of the "
                        f"{len(devices)} chips of {topo.describe()}; set one of mesh.data/fsdp/tensor to -1")
    return lower_on(cfg, mesh, model_config(cfg), "chips")


def lower_local(cfg):
    """The same step on this machine's devices, the mesh and model exactly as `kslm train` builds them."""
    return lower_on(cfg, sharding.make_mesh(cfg.mesh), llama.ModelConfig.from_config(cfg), "devices")


def lower_on(cfg, mesh, mc: llama.ModelConfig, unit: str):
    per_slice = cfg.train.batch_size // cfg.train.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if per_slice % shards:
        raise KslmError(f"train.batch_size={cfg.train.batch_size} / train.grad_accum={cfg.train.grad_accum} = "
                        f"{per_slice} rows per micro-batch do not split over data x fsdp = {shards} {unit}; "
                        f"use a multiple of {shards}")
    rules = sharding.rules(cfg.mesh.rules)
    model = llama.Transformer(mc)
    tx, lr_fn = optim.make(cfg.optim, cfg.train.steps)
    abstract, shardings = state_lib.abstract_and_shardings(model, tx, cfg.train.seed, mesh, rules)
    loss = step_lib.lm_loss(model, cfg.train.z_loss, cfg.train.loss_chunk, cfg.train.loss_impl)
    step = step_lib.jit_train_step(loss, tx, lr_fn, cfg.train.grad_accum, mesh, shardings, None, rules)
    with jax.set_mesh(mesh):
        lowered = step.lower(abstract, _abstract_batch(cfg, mesh), None)
    return lowered, mesh, mc, abstract


def memory_of(compiled) -> dict:
    """The compiler's memory accounting of one device's program, in bytes; `total` counts donated inputs once."""
    mem = compiled.memory_analysis()
    memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
              "code": mem.generated_code_size_in_bytes}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                       + memory["code"])
    return memory


def _size(value: str, unit: str) -> float:
    return float(value) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[unit]


def compiler_oom_sizes(text: str) -> tuple[float, float] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-memory refusal, or None."""
    m = next(filter(None, (p.search(text) for p in _OOM)), None)
    return (_size(m.group(1), m.group(2)), _size(m.group(3), m.group(4))) if m else None


def lever(cfg, state_bytes_per_chip: float, hbm: float) -> str:
    """The first thing to change when a config does not fit: shard the state, recompute, or shrink the batch."""
    if state_bytes_per_chip > 0.5 * hbm:
        return ("raise mesh.fsdp (parameters and optimizer state alone take "
                f"{state_bytes_per_chip / topo_lib.GiB:.1f} GiB per chip)")
    if cfg.model.remat == "none":
        return "set model.remat=dots (or full) so activations are recomputed instead of stored"
    return f"lower train.batch_size={cfg.train.batch_size} or raise train.grad_accum={cfg.train.grad_accum}"


def shard_bytes(x) -> int:
    """Bytes of one device's shard of array (or ShapeDtypeStruct) `x` under its sharding."""
    return x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))


def state_bytes_per_device(abstract) -> float:
    """Bytes of the state one device holds: each leaf's shard under its sharding."""
    return float(sum(shard_bytes(x) for x in jax.tree.leaves(abstract)))


def compile_facts(cfg, topo: topo_lib.Topology) -> tuple[dict, str]:
    """Compile once: (what the compiler says about the program, the optimized program's text). The facts are
    its memory and cost analysis, the compile seconds, the state's bytes per chip and the mesh; raises DoesNotFit
    (the one-line refusal) when the compiler runs out of HBM."""
    t0 = time.perf_counter()
    lowered, mesh, _, abstract = lower(cfg, topo)
    state_bytes = state_bytes_per_device(abstract)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is translated
        refusal = oom_refusal(cfg, topo, str(e), state_bytes)
        if refusal is None:
            raise
        raise DoesNotFit(refusal) from None
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    facts = {"memory": memory_of(compiled), "compile_seconds": time.perf_counter() - t0, "state_bytes": state_bytes,
             "mesh": dict(mesh.shape), "xla_flops": float(cost.get("flops", 0.0)),
             "xla_bytes": float(cost.get("bytes accessed", 0.0))}
    return facts, compiled.as_text()


def compile_report(cfg, topo: topo_lib.Topology) -> dict:
    """Compile and account; raises DoesNotFit (the one-line refusal) when the step needs more HBM than a chip has."""
    facts, text = compile_facts(cfg, topo)
    return account(cfg, topo, facts, text)


def account(cfg, topo: topo_lib.Topology, facts: dict, hlo_text: str) -> dict:
    """The report from what the compiler gave (`facts`: its memory and cost analysis, compile seconds, the
    state's bytes and the mesh) and the optimized program's text, whose loops hlo_cost weights by trip count."""
    mc = model_config(cfg)
    hbm = topo.chip.hbm_bytes
    memory = dict(facts["memory"], hbm=hbm, headroom=hbm - facts["memory"]["total"])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    chips = topo.devices_total
    analytic = llama.flops_per_token(mc, cfg.data.seq_len) * tokens
    attention = llama.attention_flops_per_token(mc, cfg.data.seq_len) * tokens
    hc = hlo_cost.analyze(hlo_text)
    report = {
        "topology": {"name": topo.name, "jax": topo.jax_name, "slices": topo.slices, "chips": chips,
                     "chips_per_host": topo.chips_per_host, "hosts": topo.hosts},
        "chip": dataclasses.asdict(topo.chip),
        "mesh": facts["mesh"], "rules": cfg.mesh.rules, "attention": mc.attention, "remat": mc.remat,
        "scan_layers": mc.scan_layers, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum, "tokens_per_step": tokens,
        "memory_per_chip": memory, "fits": memory["total"] <= hbm,
        "state_bytes_per_chip": facts["state_bytes"],
        # matmul FLOPs of the compiled program, each loop body times its trip count (hlo_cost)
        "flops_per_chip_compiled": hc["flops"],
        # a Pallas kernel is opaque to both counts: Splash's share is the analytic attention term
        "flops_per_chip_kernels": attention / chips if mc.attention == "splash" else 0.0,
        "flops_per_chip_analytic": analytic / chips,
        "attention_flops_per_chip_analytic": attention / chips,
        "flops_per_step_analytic": analytic,
        # XLA's own cost_analysis(), which visits each loop body once: kept to show the difference
        "flops_per_chip_xla": facts["xla_flops"], "bytes_accessed_per_chip_xla": facts["xla_bytes"],
        "bytes_accessed_per_chip": hc["bytes"],
        "collectives_per_chip": hc["collectives"],
        "loops_counted_once": hc["unknown_loops"],
        "top_matmuls_per_chip": hc["top_matmuls"],
        "compile_seconds": facts["compile_seconds"],
    }
    report["roofline"] = roofline(report, topo)
    if not report["fits"]:
        raise DoesNotFit(_refusal(cfg, topo, memory["total"], hbm, facts["state_bytes"]))
    return report


def oom_refusal(cfg, topo, error_text: str, state_bytes: float) -> str | None:
    """The one-line refusal for the compiler's out-of-memory error text; None for any other error."""
    sizes = compiler_oom_sizes(error_text)
    return None if sizes is None else _refusal(cfg, topo, sizes[0], sizes[1], state_bytes)


def _refusal(cfg, topo, used: float, hbm: float, state_bytes: float) -> str:
    return (f"does not fit: {topo.describe()} needs {used / topo_lib.GiB:.1f} GiB per chip of "
            f"{hbm / topo_lib.GiB:.2f} GiB HBM; {lever(cfg, state_bytes, hbm)}")


def roofline(r: dict, topo: topo_lib.Topology) -> dict:
    """An estimate, not a measurement: per-chip compute, HBM, ICI and DCN time from the chip's published peaks.

    Compute is the compiled program's matmul FLOPs (loops times their trip counts, remat recomputation
    included) plus the analytic share of opaque kernels; HBM is the program's bytes moved; ICI its collective
    payloads. MFU is given as a range: `mfu_overlap` if communication hid entirely behind compute or HBM
    traffic, `mfu_serial` if none of it did. These bound the model, not a real run, which also loses time
    elsewhere. MFU is never clamped: above 100% means the program was counted short (`warning` says so).
    """
    chip = topo.chip
    useful = r["flops_per_chip_analytic"]
    executed = r["flops_per_chip_compiled"] + r["flops_per_chip_kernels"]
    compute = executed / chip.peak_flops
    hbm = r["bytes_accessed_per_chip"] / chip.hbm_bw
    # a ring all-reduce is a reduce-scatter plus an all-gather: twice the traffic of its payload
    coll = sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in r["collectives_per_chip"].items())
    ici = coll / (chip.ici_bw / 2)
    dcn = 0.0
    if topo.slices > 1:
        # the data-parallel gradient all-reduce across slices: each chip's fp32 gradient shard (a third of its
        # params + Adam state) crosses the DCN, whose host NICs its chips share
        per_chip_bw = chip.dcn_bw_per_host / topo.chips_per_host
        dcn = 2 * (topo.slices - 1) / topo.slices * r["state_bytes_per_chip"] / 3 / per_chip_bw
    overlap = max(compute, hbm, ici, dcn)
    serial = max(compute, hbm) + ici + dcn
    terms = {"compute": compute, "HBM": hbm, "ICI": ici, "DCN": dcn}
    out = {"estimate": True, "bound": max(terms, key=terms.get), "compute_flops": executed, "compute_s": compute, "hbm_s": hbm, "ici_s": ici,
           "dcn_s": dcn, "step_s_overlap": overlap, "step_s_serial": serial,
           "mfu_overlap": useful / (overlap * chip.peak_flops), "mfu_serial": useful / (serial * chip.peak_flops),
           "tokens_per_s_serial": r["tokens_per_step"] / serial,
           "source": "peak bf16 FLOP/s, HBM and ICI bandwidth and host NICs from the Cloud TPU docs (train/topology.py)"}
    short = []
    if executed < 0.99 * useful:
        short.append(f"the program counts {executed / useful:.0%} of the model's analytic FLOPs")
    if r["loops_counted_once"]:
        short.append(f"{r['loops_counted_once']} loop(s) with no readable trip count were counted once")
    if short:
        out["warning"] = "; ".join(short) + ": the roofline undercounts this program"
    return out


def format_report(r: dict) -> str:
    g = topo_lib.GiB
    m = r["memory_per_chip"]
    t = r["topology"]
    lines = [f"topology  {t['slices']} x {t['name']} ({t['jax']}): {t['chips']} chips, {t['chips_per_host']} per host, "
             f"{t['hosts']} hosts; mesh {r['mesh']} rules={r['rules']} attention={r['attention']} remat={r['remat']}",
             f"batch     {r['batch_size']} x {r['seq_len']} tokens (grad_accum {r['grad_accum']})",
             "memory per chip (GiB): " + "  ".join(f"{k} {m[k] / g:.2f}" for k in
                                                    ("arguments", "outputs", "aliased", "temporaries", "code")),
             f"          total {m['total'] / g:.2f} of {m['hbm'] / g:.0f} HBM: "
             + (f"fits, {m['headroom'] / g:.2f} GiB headroom" if r["fits"] else "DOES NOT FIT"),
             f"flops     per chip per step: compiled matmuls {r['flops_per_chip_compiled'] / 1e12:.4g} TFLOP (loops x "
             f"trip count) + {r['flops_per_chip_kernels'] / 1e12:.4g} in opaque kernels (Splash, analytic); "
             f"analytic 6N + attention {r['flops_per_chip_analytic'] / 1e12:.4g} "
             f"(XLA cost_analysis, loop bodies once: {r['flops_per_chip_xla'] / 1e12:.4g})",
             "collectives per chip per step (optimized HLO, loops x trip count):"]
    for kind, v in r["collectives_per_chip"].items():
        if v["count"]:
            lines.append(f"          {kind:<19} {v['count']:>7.0f}  {v['bytes'] / 2 ** 20:>10.1f} MiB")
    rf, c = r["roofline"], r["chip"]
    lines += [f"compile   {r['compile_seconds']:.1f} s on this machine",
              f"ESTIMATE  roofline step {rf['step_s_overlap'] * 1e3:.1f}-{rf['step_s_serial'] * 1e3:.1f} ms (compute "
              f"{rf['compute_s'] * 1e3:.1f}, HBM {rf['hbm_s'] * 1e3:.1f}, ICI {rf['ici_s'] * 1e3:.1f}, DCN "
              f"{rf['dcn_s'] * 1e3:.1f} ms), MFU {rf['mfu_serial']:.0%}-{rf['mfu_overlap']:.0%} (no overlap - full "
              "overlap): an estimate from the compiler and a roofline, not a TPU run",
              f"          chip: {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16, HBM {c['hbm_bw'] / 1e9:.0f} GB/s, "
              f"ICI {c['ici_bw'] / 1e9:.0f} GB/s (Cloud TPU docs)"]
    if "warning" in rf:
        lines.append(f"WARNING   {rf['warning']}")
    return "\n".join(lines)
