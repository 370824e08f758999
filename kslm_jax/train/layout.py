"""What `kslm inspect` reports: every parameter with its shape, dtype, count, PartitionSpec and bytes per device
on the configured mesh, the totals per module and per device (parameters, optimizer state, gradients), and
the compiled train step's memory and FLOPs on this machine's devices.

The step is the one `kslm compile` lowers for a TPU topology (aot.lower_on), here on the local devices with the
mesh and model exactly as `kslm train` builds them; the state exists only as shapes, nothing is allocated.
"""
from __future__ import annotations

import collections
import math
import time

import jax

from kslm_jax.core import checkpoint
from kslm_jax.model import llama
from kslm_jax.train import aot, oom

def report(cfg) -> dict:
    t0 = time.perf_counter()
    lowered, mesh, mc, abstract = aot.lower_local(cfg)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    params = [_row(path, x) for path, x in jax.tree_util.tree_flatten_with_path(abstract.params)[0]]
    shards = sum(r["per_device_elements"] for r in params)
    grads = sum(r["per_device_bytes"] for r in params)
    per_device = {"params": grads, "opt_state": aot.state_bytes_per_device(abstract.opt_state),
                  # gradients take the parameters' shapes, dtype and sharding; accumulation sums them in fp32
                  "grads": grads, "grad_accumulator": 4 * shards if cfg.train.grad_accum > 1 else 0}
    per_device["total"] = sum(per_device.values())
    devices = list(mesh.devices.flat)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = aot.memory_of(compiled)
    memory["device_limit"] = oom.device_limit(devices[0])
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {
        "mesh": dict(mesh.shape), "rules": cfg.mesh.rules, "devices": len(devices),
        "device_kind": devices[0].device_kind, "attention": mc.attention, "remat": mc.remat,
        "scan_layers": mc.scan_layers, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum,
        "params": params, "modules": _modules(params), "param_count": sum(r["count"] for r in params),
        "per_device": per_device, "memory_per_device": memory,
        "flops_per_device_compiled": float(cost.get("flops", 0.0)) if cost else 0.0,
        "flops_per_step_analytic": llama.flops_per_token(mc, cfg.data.seq_len) * tokens,
        "compile_seconds": seconds,
    }


def _row(path, x) -> dict:
    shard = x.sharding.shard_shape(x.shape)
    count = math.prod(x.shape)
    per_device = math.prod(shard)
    return {"name": checkpoint.leaf_name(path), "shape": list(x.shape),
            "dtype": str(x.dtype), "count": count, "spec": _spec(x.sharding.spec),
            "per_device_shape": list(shard), "per_device_elements": per_device,
            "per_device_bytes": per_device * x.dtype.itemsize}


def _modules(params: list[dict]) -> list[dict]:
    """Every module (each prefix of a parameter's path) with its parameter count and bytes per device."""
    totals: dict = collections.OrderedDict()
    for r in params:
        parts = r["name"].split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            t = totals.setdefault("/".join(parts[:depth]), {"count": 0, "per_device_bytes": 0})
            t["count"] += r["count"]
            t["per_device_bytes"] += r["per_device_bytes"]
    return [{"module": k, **v} for k, v in totals.items()]


def _spec(spec) -> str:
    return "P(" + ", ".join(map(repr, spec)) + ")"


def format_report(r: dict) -> str:
    width = max(len(p["name"]) for p in r["params"]) + 2
    lines = [f"mesh {r['mesh']} over {r['devices']} x {r['device_kind']}, rules={r['rules']}, attention="
             f"{r['attention']}, remat={r['remat']}, scan_layers={r['scan_layers']}, batch {r['batch_size']} x "
             f"{r['seq_len']} (grad_accum {r['grad_accum']})", "",
             f"{'parameter':<{width}}{'shape':>16}  {'dtype':<9}{'count':>13}  {'PartitionSpec':<28}{'per device':>12}"]
    for p in r["params"]:
        lines.append(f"{p['name']:<{width}}{'x'.join(map(str, p['shape'])):>16}  {p['dtype']:<9}{p['count']:>13,}  "
                     f"{p['spec']:<28}{oom.size(p['per_device_bytes']):>12}")
    lines += ["", f"{'module':<{width}}{'count':>13}{'per device':>14}"]
    for m in r["modules"]:
        depth = m["module"].count("/")
        lines.append(f"{'  ' * depth + m['module'].split('/')[-1]:<{width}}{m['count']:>13,}"
                     f"{oom.size(m['per_device_bytes']):>14}")
    lines.append(f"{'total':<{width}}{r['param_count']:>13,}{oom.size(r['per_device']['params']):>14}")
    d, m = r["per_device"], r["memory_per_device"]
    accum = f" + fp32 accumulator {oom.size(d['grad_accumulator'])}" if d["grad_accumulator"] else ""
    limit = m["device_limit"]
    verdict = (f" of {oom.size(limit)} the device has: " + ("fits" if m["total"] <= limit else "DOES NOT FIT")
               if limit else " (the device reports no memory limit)")
    lines += ["", f"per device: parameters {oom.size(d['params'])}, optimizer state {oom.size(d['opt_state'])}, "
                  f"gradients {oom.size(d['grads'])}{accum}; together {oom.size(d['total'])}",
              "compiled train step per device: " + ", ".join(f"{k} {oom.size(m[k])}" for k in
                                                             ("arguments", "outputs", "aliased", "temporaries", "code"))
              + f"; total {oom.size(m['total'])}{verdict}",
              f"flops: compiled {r['flops_per_device_compiled'] / 1e9:.4g} GFLOP per device per step (a scanned "
              f"layer or accumulation loop counted once); analytic 6N + attention "
              f"{r['flops_per_step_analytic'] / 1e9:.4g} GFLOP per step over all devices",
              f"compile {r['compile_seconds']:.1f} s"]
    return "\n".join(lines)
