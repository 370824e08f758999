"""Preference pairs for finetune.kind=dpo: {prompt, chosen, rejected} records → two token sequences per pair.

Both sides of a pair render `finetune.template` as SFT does (data/finetune_data.py: special tokens, the prompt
and the response encoded apart, the loss mask on the response and the end marker after it), so a side's
log-probability is a sum over its response tokens only. A pair is packed as one item holding two segments of
the same row: the chosen sequence is segment 2k-1 and the rejected one segment 2k, each with positions from 0
and attention only within itself. A pair is therefore never split across rows, batches or micro-batches, and
the loss finds both halves of pair k from the segment ids alone.

A record whose chosen or rejected response is missing or empty is refused with its file and line: a preference
with nothing on one side is a mistake in the data, not a record to count and drop. Other records left out (too
long) are counted in the report, as for SFT; the held-out split is chosen by the same hash as `kslm prepare`.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from kslm_jax.core.errors import KslmError
from kslm_jax.data import finetune_data, packing
from kslm_jax.data import tokenizer as tok_lib


class PairSet:
    """Pairs as flat per-position arrays: pair i's inputs are [chosen inputs, rejected inputs], starting at
    starts[i] and `lengths[i]` long; `half` is 0 on its chosen positions and 1 on its rejected ones."""

    def __init__(self, chosen: list, rejected: list, chosen_flags: list, rejected_flags: list):
        feats = {k: [] for k in ("inputs", "targets", "loss_mask", "half", "pos")}
        for sides in zip(chosen, chosen_flags, rejected, rejected_flags):
            for h, (ids, fl) in enumerate((sides[:2], sides[2:])):
                n = len(ids) - 1
                feats["inputs"].append(np.asarray(ids[:-1], np.int32))
                feats["targets"].append(np.asarray(ids[1:], np.int32))
                feats["loss_mask"].append(np.asarray(fl[1:], np.int32))
                feats["half"].append(np.full(n, h, np.int32))
                feats["pos"].append(np.arange(n, dtype=np.int32))
        self.flat = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in feats.items()}
        self.lengths = np.asarray([len(c) + len(r) - 2 for c, r in zip(chosen, rejected)], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self) -> int:
        return int(self.lengths.sum())


def fill(ps: PairSet, plan: list[list[int]], rows: int, seq_len: int, _max_pairs: int = 0) -> dict:
    """The arrays of one batch of packed pairs: item k of a row becomes segments 2k+1 (chosen), 2k+2 (rejected)."""
    take = {k: (v, 0) for k, v in ps.flat.items()}
    if plan:
        out = packing.gather(plan, ps.starts[:-1], ps.lengths, rows, seq_len, take)
    else:
        out = {k: np.zeros((rows, seq_len), np.int32) for k in (*take, "positions", "segment_ids")}
    real = out["segment_ids"] > 0
    out["segment_ids"] = np.where(real, 2 * out["segment_ids"] - 1 + out.pop("half"), 0).astype(np.int32)
    out["positions"] = out.pop("pos")
    return out


def max_pairs(max_segments: int) -> int:
    """Pairs a row may hold: two segments each, within data.max_segments_per_row."""
    if max_segments < 2:
        raise KslmError("config key data.max_segments_per_row must be at least 2 for finetune.kind=dpo "
                        "(each pair takes two segments of a row)")
    return max_segments // 2


@dataclasses.dataclass
class PairSplit:
    pairs: PairSet
    counts: collections.Counter


@dataclasses.dataclass
class PairData:
    train: PairSplit
    val: PairSplit

    def report(self) -> dict:
        def one(s: PairSplit):
            return dict(sorted(s.counts.items()), tokens=s.pairs.tokens())
        return {"train": one(self.train), "val": one(self.val)}


def _text(rec: dict, key: str, where: str, what: str) -> str:
    v = rec.get(key)
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise KslmError(f"{where}: no {what} in field {key!r} (config key finetune.{what}_field); every preference "
                        "pair needs a prompt, a chosen and a rejected response: fix or remove that record")
    if what != "prompt" and str(v).strip() == "":
        raise KslmError(f"{where}: the {what} response (field {key!r}) is empty; a preference pair needs text on "
                        "both sides: fix or remove that record")
    return str(v)


def build(cfg, sp) -> PairData:
    f = cfg.finetune
    tmpl = finetune_data.Template(f.template, sp, "config key finetune.template")
    closed = tmpl.parts[-1][0] == "ids" and bool(tmpl.special_ids)
    fields = (("prompt", f.prompt_field), ("chosen", f.chosen_field), ("rejected", f.rejected_field))
    raw: dict = {"train": [], "val": []}
    counts = {"train": collections.Counter(), "val": collections.Counter()}
    for split, where, rec in finetune_data.split_records(f, counts, [key for _, key in fields]):
        counts[split]["records"] += 1
        raw[split].append(tuple(_text(rec, key, where, what) for what, key in fields))
    if not raw["train"]:
        raise KslmError(f"no preference pair for training in {f.train_files} (counts: {dict(counts['train'])})")
    splits = {s: PairSplit(_encode(raw[s], tmpl, sp, cfg.data.seq_len, f.too_long, counts[s], not closed),
                           counts[s]) for s in ("train", "val")}
    return PairData(splits["train"], splits["val"])


def _encode(triples, tmpl: finetune_data.Template, sp, seq_len: int, too_long: str, c, add_eos: bool) -> PairSet:
    """Token ids and response flags of both sides; a pair over seq_len positions is dropped, or with
    too_long=truncate has each side's response end cut to half the row (when its prompt fits there)."""
    enc = {k: sp.Encode([t[i] for t in triples], out_type=int) if triples else [] for i, k in enumerate("pcr")}
    half = seq_len // 2
    out: dict = {"c": [], "r": [], "fc": [], "fr": []}
    for p, ch, rj in zip(enc["p"], enc["c"], enc["r"]):
        sides = []
        for resp in (ch, rj):
            ids, fl, prefix = tmpl.encode({}, {"prompt": p, "response": resp}, loss_from="response")
            if add_eos:
                ids, fl = ids + [tok_lib.EOS], fl + [1]
            sides.append((ids, fl, prefix))
        if sum(len(s[0]) - 1 for s in sides) > seq_len:
            if too_long != "truncate" or any(prefix + 1 > half for _, _, prefix in sides):
                c["too_long_dropped"] += 1
                continue
            sides = [(ids[: half + 1], fl[: half + 1], prefix) for ids, fl, prefix in sides]
            c["truncated"] += 1
        for key, (ids, fl, _) in zip(("c", "r"), sides):
            out[key].append(ids)
            out["f" + key].append(fl)
    c["pairs"] = len(out["c"])
    return PairSet(out["c"], out["r"], out["fc"], out["fr"])
