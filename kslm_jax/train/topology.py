"""Cloud TPU accelerator types (v4-32, v5litepod-16 / v5e-16, v5p-128, v6e-64) as compiler topologies.

Per-chip numbers are the Cloud TPU documentation's system-architecture tables (cloud.google.com/tpu/docs/v4,
/v5e, /v5p, /v6e): peak bf16 FLOP/s, HBM capacity and bandwidth, bidirectional ICI bandwidth, and the host's
data-center network (DCN) NICs. They feed a roofline estimate, never a measurement.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

from jax.experimental import topologies

from kslm_jax.core.errors import KslmError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str        # the jax topology prefix: v4, v5e, v5p, v6e
    hbm_bytes: int
    peak_flops: float      # dense bf16
    hbm_bw: float          # bytes/s
    ici_bw: float          # bytes/s, bidirectional, per chip
    dcn_bw_per_host: float  # bytes/s, the host's NICs
    dims: int              # 2-D or 3-D torus
    cores_per_chip: int    # v4-N and v5p-N count TensorCores (2 per chip); v5e-N and v6e-N count chips


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 300e9, 100e9 / 8, 3, 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9, 200e9 / 8, 2, 1),
    # ICI 1200 GB/s bidirectional per chip (the v5p table; its older "4800 Gbps" is one direction)
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 1200e9, 200e9 / 8, 3, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1638e9, 800e9, 400e9 / 8, 2, 1),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
CHIPS_PER_HOST = 4      # multi-host slices; a slice of up to 8 v5e/v6e chips is one host
MAX_CHIPS = {"v4": 4096, "v5e": 256, "v5p": 8960, "v6e": 256}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str              # as given, e.g. v5e-256
    chip: Chip
    chips: int             # per slice
    shape: tuple           # the torus, e.g. (16, 16)
    slices: int = 1

    @property
    def jax_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host(self) -> int:
        if self.chip.dims == 2 and self.chips <= 8:
            return self.chips
        return min(CHIPS_PER_HOST, self.chips)

    @property
    def hosts(self) -> int:
        return self.slices * self.chips // self.chips_per_host

    @property
    def devices_total(self) -> int:
        return self.slices * self.chips

    def describe(self) -> str:
        s = f"{self.slices} x " if self.slices > 1 else ""
        return (f"{s}{self.name} ({self.jax_name}, {self.chips} chips per slice, {self.chips_per_host} per host, "
                f"{self.hosts} hosts)")


def _torus(chips: int, dims: int) -> tuple:
    """The most balanced power-of-two torus, smallest side first (gcloud's default shapes: 4x8, 4x4x8)."""
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape))


def parse(name: str, slices: int = 1) -> Topology:
    """'v5e-16' -> Topology; unknown generations, counts that are not a valid slice, or slices < 1 are refused."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in CHIPS:
        raise KslmError(f"--topology {name!r} is not a TPU accelerator type: use one of "
                        f"{', '.join(g + '-N' for g in CHIPS)} (or v5litepod-N), e.g. v5e-16, v5p-128, v6e-64")
    chip = CHIPS[gen]
    count = int(m.group(2))
    chips, rem = divmod(count, chip.cores_per_chip)
    unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    if rem or chips < 1 or chips & (chips - 1) or chips > MAX_CHIPS[gen]:
        raise KslmError(f"--topology {name!r}: {count} {unit} is not a {gen} slice; the count must be "
                        f"{chip.cores_per_chip} x a power of two up to {MAX_CHIPS[gen] * chip.cores_per_chip}")
    if slices < 1:
        raise KslmError(f"--slices {slices}: must be 1 or more")
    return Topology(name, chip, chips, _torus(chips, chip.dims), slices)


def devices(topo: Topology) -> list:
    """The slice's devices as the TPU compiler sees them (libtpu, from the `tpu` extra); no TPU is needed."""
    try:
        import libtpu  # noqa: F401 - only to say which extra is missing
    except ImportError:
        raise KslmError("kslm compile needs libtpu: pip install 'kslm_jax[tpu]'") from None
    # Off a TPU VM several processes may load libtpu at once (tests, benchmarks); its lockfile is for
    # processes sharing real chips, which a compile-only process never touches.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": topo.slices} if topo.slices > 1 else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.jax_name, **kwargs)
    return list(desc.devices)
