"""Per-chip cost of an optimized HLO module with every loop body weighted by its trip count.

XLA's `cost_analysis()` visits a while loop's body once, so a scanned layer stack or a grad_accum scan counts
as one iteration. This walks the compiled program's text and multiplies each computation by how often it runs.
Counted: matmul FLOPs (dot, and convolution, which is what the TPU compiler turns a dot into; padding excluded
as HloCostAnalysis does), HBM bytes of each unfused instruction (operands and results, as HloCostAnalysis counts
a fusion) and collective payloads. Not counted: the inside of a custom kernel (Pallas/Mosaic: Splash attention).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTR = re.compile(r"^\s+(ROOT )?%([\w.\-]+) = ")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
# Bookkeeping that moves no data (or aliases it) and control ops whose callees are counted instead.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "add-dependency",
         "while", "call", "conditional", "partition-id", "replica-id", "opt-barrier", "iota"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list
    attrs: str
    args: str = ""
    root: bool = False


def _closing(s: str, i: int) -> int:
    """Index just past the bracket group that opens at s[i]."""
    depth, opener, closer = 0, s[i], {"(": ")", "[": "]", "{": "}"}[s[i]]
    for j in range(i, len(s)):
        if s[j] == opener:
            depth += 1
        elif s[j] == closer:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _closing(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    op = rest[:paren]
    close = _closing(rest, paren)
    operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
    return Instr(m.group(2), shape, op, operands, rest[close:], rest[paren + 1:close - 1], bool(m.group(1)))


def parse(text: str) -> tuple[dict, str]:
    """({computation name: [Instr]}, entry name) of an HLO module's text."""
    raw, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = raw.setdefault(h.group(1), [])
                if line.startswith("ENTRY"):
                    entry = h.group(1)
        elif line.rstrip() == "}":
            current = None
        elif _INSTR.match(line) or not current:
            current.append(line)
        else:   # an attribute that spans lines (a kernel's metadata): part of the instruction above
            current[-1] += " " + line
    comps = {name: [i for i in map(_parse_instr, lines) if i] for name, lines in raw.items()}
    return comps, entry


def array_bytes(shape: str) -> float:
    return sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in filter(None, dims.split(",")))
               for dt, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _dot_flops(ins: Instr, shapes: dict) -> float:
    lhs = _dims(shapes.get(ins.operands[0], ""))
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
    contract = [int(d) for d in filter(None, m.group(1).split(","))] if m else []
    return 2.0 * math.prod(_dims(ins.shape)) * math.prod(lhs[d] for d in contract if d < len(lhs))


def _matmul_flops(ins: Instr, shapes: dict) -> float:
    return {"dot": _dot_flops, "convolution": _conv_flops}.get(ins.op, lambda *_: 0.0)(ins, shapes)


def _window(attrs: str) -> list[dict]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}
    size = [int(x) for x in fields["size"].split("x")] if "size" in fields else []

    def per_dim(key, default):
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * len(size)
    pads = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")] if "pad" in fields \
        else [(0, 0)] * len(size)
    return [{"size": s, "stride": st, "lo": p[0], "hi": p[1], "base": b, "dil": d}
            for s, st, p, b, d in zip(size, per_dim("stride", 1), pads, per_dim("lhs_dilate", 1),
                                      per_dim("rhs_dilate", 1))]


def _valid_positions(w: dict, n_in: int, n_out: int, n_kernel: int) -> int:
    """(output, kernel) index pairs of one spatial dimension that read a real (unpadded) input element."""
    count = 0
    for k in range(n_kernel):
        if w["stride"] == 1 and w["base"] == 1:   # the outputs o with 0 <= o - lo + k*dil < n_in, in closed form
            first = w["lo"] - k * w["dil"]
            count += max(min(n_in + first, n_out) - max(first, 0), 0)
            continue
        for o in range(n_out):
            idx = o * w["stride"] - w["lo"] + k * w["dil"]
            if idx % w["base"] == 0 and 0 <= idx // w["base"] < n_in:
                count += 1
    return count


def _conv_flops(ins: Instr, shapes: dict) -> float:
    (lhs, rhs), out = (_dims(shapes.get(o, "")) for o in ins.operands[:2]), _dims(ins.shape)
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not m or not lhs or not rhs:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    groups = int((re.search(r"feature_group_count=(\d+)", ins.attrs) or [0, 1])[1])
    batch_groups = int((re.search(r"batch_group_count=(\d+)", ins.attrs) or [0, 1])[1])
    valid = 1
    for d, w in enumerate(_window(ins.attrs)):
        n_in, n_k, n_out = lhs[lhs_l.index(str(d))], rhs[rhs_l.index(str(d))], out[out_l.index(str(d))]
        valid *= _valid_positions(w, n_in, n_out, n_k)
    fma = (lhs[lhs_l.index("f")] // groups) * out[out_l.index("f")] * (lhs[lhs_l.index("b")] // batch_groups)
    return 2.0 * fma * valid


def _const(ins: Instr | None) -> int | None:
    return int(ins.args) if ins is not None and ins.op == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()) \
        else None


def _index(ins: Instr | None) -> int | None:
    m = re.search(r"index=(\d+)", ins.attrs) if ins is not None and ins.op == "get-tuple-element" else None
    return int(m.group(1)) if m else None


def _through(ins: Instr | None, by_name: dict) -> Instr | None:
    """The value under any copies and bitcasts (the compiler moves a loop counter between memories)."""
    while ins is not None and ins.op in ("copy", "bitcast", "convert") and ins.operands:
        ins = by_name.get(ins.operands[0])
    return ins


def trip_count(loop: Instr, caller: list, cond: list, body: list) -> int | None:
    """Iterations of a counted loop `for (i = init; i < limit; i += step)`, read from the loop's condition (the
    limit), its body (the step: the TPU compiler's windowed matmul loops advance by 2) and the caller (init);
    None when the loop is not of that form."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond_by = {i.name: i for i in cond}
    root = next((i for i in cond if i.root), None)
    if root is None or root.op != "compare" or len(root.operands) != 2:
        return None
    a, b = (_through(cond_by.get(o), cond_by) for o in root.operands)
    if "direction=GT" in root.attrs:
        a, b = b, a
    elif "direction=LT" not in root.attrs:
        return None
    slot, limit = _index(a), _const(b)
    if slot is None or limit is None:
        return None
    body_by = {i.name: i for i in body}
    body_root = next((i for i in body if i.root), None)
    step = None
    if body_root is not None and body_root.op == "tuple" and slot < len(body_root.operands):
        nxt = _through(body_by.get(body_root.operands[slot]), body_by)
        if nxt is not None and nxt.op == "add":
            parts = [_through(body_by.get(o), body_by) for o in nxt.operands]
            if any(_index(p) == slot for p in parts):
                step = next((_const(p) for p in parts if _const(p) is not None), None)
    if not step or step < 1:
        return None
    caller_by = {i.name: i for i in caller}
    init_tuple = caller_by.get(loop.operands[0]) if loop.operands else None
    init = 0
    if init_tuple is not None and init_tuple.op == "tuple" and slot < len(init_tuple.operands):
        value = _const(_through(caller_by.get(init_tuple.operands[slot]), caller_by))
        init = 0 if value is None else value
    return max(0, -(-(limit - init) // step))


class Module:
    """An HLO module with how many times each computation runs per step (`weight`), through every loop
    (times its trip count), call, fusion and conditional branch above it."""

    def __init__(self, text: str):
        self.comps, self.entry = parse(text)
        self.by_name = {c: {i.name: i for i in instrs} for c, instrs in self.comps.items()}
        self.shapes = {c: {n: i.shape for n, i in by.items()} for c, by in self.by_name.items()}
        self.unknown_loops = set()
        self.fused = set()     # bodies of fusions: their traffic is counted at the fusion instruction
        self._user_cache = {}
        self.weight = collections.Counter()
        self._walk(self.entry, 1.0)
        self.matmul_rows = self._matmul_rows()  # read by flops() and matmuls(): each FLOP count made once

    def _walk(self, comp: str, weight: float) -> None:
        self.weight[comp] += weight
        for ins in self.comps[comp]:
            calls = dict(_CALLS.findall(ins.attrs))
            if ins.op == "while":
                n = trip_count(ins, self.comps[comp], self.comps.get(calls.get("condition"), []),
                               self.comps.get(calls.get("body"), []))
                if n is None:
                    self.unknown_loops.add(ins.name)
                self._walk(calls["body"], weight * (1 if n is None else n))
            elif calls.get("calls") in self.comps:
                if ins.op == "fusion":
                    self.fused.add(calls["calls"])
                self._walk(calls["calls"], weight)
            for group in _BRANCHES.findall(ins.attrs):
                names = [n for n in re.findall(r"%([\w.\-]+)", group) if n in self.comps]
                for name in names:   # a conditional runs one of its branches: count their mean
                    self._walk(name, weight / len(names) if ins.op == "conditional" else weight)

    def flops(self) -> float:
        return sum(r["flops"] for r in self.matmul_rows)

    def bytes(self) -> float:
        return sum(w * sum(self._traffic(i, self.shapes[c]) for i in self.comps[c]
                           if i.op not in _FREE and not i.op.endswith("-done"))
                   for c, w in self.weight.items() if c not in self.fused)

    def _traffic(self, ins: Instr, shapes: dict) -> float:
        """HBM bytes one instruction moves. As HloCostAnalysis does, a slice reads only its window and an
        in-place update writes only its update, also through nested fusions: a scanned layer reads its slice
        of the stacked weights and saved activations and writes its slice of the stacked gradients, not the
        whole stack every iteration."""
        if ins.op in ("dynamic-slice", "slice"):
            return 2 * array_bytes(ins.shape)
        if ins.op.endswith("-start"):   # (operands, results, context): a slice moves its smallest, a copy its largest
            sizes = [array_bytes(f"{dt}[{d}]") for dt, d in _ARRAY.findall(ins.shape) if d]
            return 2 * ((min if ins.op == "slice-start" else max)(sizes, default=0))
        callee = dict(_CALLS.findall(ins.attrs)).get("calls") if ins.op == "fusion" else None
        if callee not in self.comps:
            return array_bytes(ins.shape) + sum(array_bytes(shapes.get(o, "")) for o in ins.operands)
        params = {int(i.args): i.name for i in self.comps[callee] if i.op == "parameter" and i.args.strip().isdigit()}
        read = sum(self._read(callee, params[k], array_bytes(shapes.get(o, "")))
                   for k, o in enumerate(ins.operands) if k in params)
        root = next((i for i in self.comps[callee] if i.root), None)
        return read + (self._written(callee, root) if root is not None else array_bytes(ins.shape))

    def _users(self, comp: str) -> dict:
        if comp not in self._user_cache:
            users = collections.defaultdict(list)
            for i in self.comps[comp]:
                for pos, o in enumerate(i.operands):
                    users[o].append((i, pos))
            self._user_cache[comp] = users
        return self._user_cache[comp]

    def _read(self, comp: str, name: str, full: float) -> float:
        """Bytes of value `name` (of size `full`) that computation `comp` reads."""
        total = 0.0
        for user, pos in self._users(comp).get(name, []):
            if user.op in ("dynamic-slice", "slice") and pos == 0:
                total += array_bytes(user.shape)
            elif user.op == "dynamic-update-slice" and pos == 0:
                continue   # the buffer updated in place
            elif user.op == "bitcast":
                total += self._read(comp, user.name, full)
            elif user.op == "fusion" and dict(_CALLS.findall(user.attrs)).get("calls") in self.comps:
                inner = dict(_CALLS.findall(user.attrs))["calls"]
                param = next((i.name for i in self.comps[inner] if i.op == "parameter" and i.args.strip() == str(pos)),
                             None)
                total += full if param is None else self._read(inner, param, full)
            else:
                return full
        return min(total, full)

    def _written(self, comp: str, ins: Instr) -> float:
        by_name = self.by_name[comp]
        if ins.op == "tuple":
            return sum(self._written(comp, by_name[o]) for o in ins.operands if o in by_name)
        if ins.op == "dynamic-update-slice":
            return array_bytes(self.shapes[comp].get(ins.operands[1], ""))
        if ins.op == "bitcast" and ins.operands and ins.operands[0] in by_name:
            return self._written(comp, by_name[ins.operands[0]])
        inner = dict(_CALLS.findall(ins.attrs)).get("calls") if ins.op == "fusion" else None
        root = next((i for i in self.comps[inner] if i.root), None) if inner in self.comps else None
        return self._written(inner, root) if root is not None else array_bytes(ins.shape)

    def _matmul_rows(self) -> list[dict]:
        """Every dot and convolution, FLOPs per step and shapes; flops() sums them, matmuls() shows the largest."""
        return [{"flops": _matmul_flops(ins, self.shapes[comp]) * weight, "times": weight,
                 "out": ins.shape.split("{")[0],
                 "operands": [self.shapes[comp].get(o, "?").split("{")[0] for o in ins.operands[:2]],
                 "op_name": (re.search(r'op_name="([^"]*)"', ins.attrs) or [None, ""])[1]}
                for comp, weight in self.weight.items() for ins in self.comps[comp] if ins.op in ("dot", "convolution")]

    def matmuls(self, top: int = 8) -> list[dict]:
        """The largest matmuls by FLOPs per step (a loop body's counted trip-count times), with their shapes."""
        return sorted(self.matmul_rows, key=lambda r: -r["flops"])[:top]

    def collectives(self) -> dict:
        """{kind: {"count", "bytes"}} per step. The TPU compiler repeats one asynchronous collective in the
        fusions that start it, consume it and finish it, under one channel_id: each channel counts once."""
        channels = {}
        for comp, weight in self.weight.items():
            for ins in self.comps[comp]:
                kind = ins.op.removesuffix("-start")
                if kind not in COLLECTIVES or ins.op.endswith("-done"):
                    continue
                sizes = [array_bytes(f"{dt}[{d}]") for dt, d in _ARRAY.findall(ins.shape)]
                # an async start returns (operands..., results..., scratch): its payload is the largest buffer
                payload = max(sizes, default=0) if ins.op.endswith("-start") else sum(sizes)
                channel = re.search(r"channel_id=(\d+)", ins.attrs)
                key = channel.group(1) if channel else (comp, ins.name)
                channels[key] = max(channels.get(key, (kind, 0.0, 0.0)), (kind, weight, payload), key=lambda t: t[1])
        out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
        for kind, weight, payload in channels.values():
            out[kind]["count"] += weight
            out[kind]["bytes"] += weight * payload
        return out


def analyze(text: str) -> dict:
    """{"flops", "bytes", "collectives", "unknown_loops", "top_matmuls"} per chip for one step."""
    mod = Module(text)
    return {"flops": mod.flops(), "bytes": mod.bytes(), "collectives": mod.collectives(),
            "unknown_loops": len(mod.unknown_loops), "top_matmuls": mod.matmuls()}
