"""Fine-tuning data: example files → rendered templates → token ids (+ response mask or label) → train/val sets.

SFT renders `finetune.template`, e.g. <|user|>{prompt}<|end|><|assistant|>{response}<|end|>: special tokens
become their single ids, text parts are encoded on their own (so user text can never merge with a marker),
and the loss covers the {response} tokens and everything after them (the end marker teaches the model to
stop). Classification renders `finetune.cls_template` and keeps the label. Records that cannot be used are
counted by reason in the report, never silently dropped; the held-out split is chosen by the same hash as
`kslm prepare` (a `finetune.split_field` such as movie_id keeps every record of a movie on one side).
"""
from __future__ import annotations

import collections
import dataclasses
import re

from kslm_jax.core.errors import KslmError
from kslm_jax.data import records as records_lib
from kslm_jax.data import sources
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.data.examples import ExampleSet
from kslm_jax.data.prepare import split_of

_PART = re.compile(r"(<\|[^|<>\s]+\|>|\{prompt\}|\{response\}|\{text\})")


class Template:
    """A template split into special tokens, literal text and {field} slots."""

    def __init__(self, text: str, sp, where: str):
        self.sp = sp
        specials = tok_lib.special_ids(sp, tok_lib.find_special(text), where)
        self.parts = []  # (kind, value): ("ids", [..]) or ("field", name)
        self.special_ids = []
        for piece in _PART.split(text):
            if not piece:
                continue
            if piece in specials:
                self.parts.append(("ids", [specials[piece]]))
                self.special_ids.append(specials[piece])
            elif piece.startswith("{") and piece.endswith("}") and _PART.fullmatch(piece):
                self.parts.append(("field", piece[1:-1]))
            else:
                self.parts.append(("ids", sp.EncodeAsIds(piece)))
        self.fields = [v for k, v in self.parts if k == "field"]

    def encode(self, values: dict, encoded: dict | None = None, loss_from: str | None = None):
        """(ids with BOS, per-id loss flags, ids before the `loss_from` field); `encoded` holds ids per field."""
        ids, flags, prefix = [tok_lib.BOS], [0], None
        on = 0
        for kind, v in self.parts:
            if kind == "field":
                if v == loss_from:
                    on, prefix = 1, len(ids)
                part = encoded[v] if encoded is not None else self.sp.EncodeAsIds(values[v])
            else:
                part = v
            ids.extend(part)
            flags.extend([on] * len(part))
        return ids, flags, prefix


@dataclasses.dataclass
class Split:
    examples: ExampleSet
    counts: collections.Counter      # records read, examples kept, and each reason a record was left out
    prompts: list                    # sft: ids up to the response, for generation
    references: list                 # sft: the response text; cls: the label
    kept: list = dataclasses.field(default_factory=list)    # per input item: whether it became an example
    groups: list = dataclasses.field(default_factory=list)  # the split_field value of each example


@dataclasses.dataclass
class FinetuneData:
    train: Split
    val: Split
    class_names: list
    end_id: int | None               # sft: the marker that ends a response

    def report(self) -> dict:
        def one(s: Split):
            out = dict(sorted(s.counts.items()), tokens=s.examples.tokens())
            if s.examples.labels is not None:
                out["per_class"] = {n: int((s.examples.labels == i).sum()) for i, n in enumerate(self.class_names)}
            return out
        return {"train": one(self.train), "val": one(self.val)}


def parse_bins(spec: str, names: list[str]) -> list[tuple[float, float, int]]:
    """"1-4:negative,9-10:positive" → [(1, 4, 0), (9, 10, 1)]."""
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        rng, sep, name = item.rpartition(":")
        lo, dash, hi = rng.partition("-") if not rng.startswith("-") else ("", "", "")
        try:
            lo_f, hi_f = float(lo), float(hi if dash else lo)
        except ValueError:
            lo_f = hi_f = None
        if not sep or lo_f is None or name.strip() not in names or lo_f > hi_f:
            raise KslmError(f"config key finetune.label_bins: {item!r} is not LOW-HIGH:NAME with NAME one of "
                            f"finetune.labels ({', '.join(names)}), e.g. 1-4:{names[0]}")
        out.append((lo_f, hi_f, names.index(name.strip())))
    return out


def label_of(value, names: list[str], bins) -> int | None:
    if bins:
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        return next((i for lo, hi, i in bins if lo <= v <= hi), -1)
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        i = int(value)
    except (TypeError, ValueError):
        return None
    return i if 0 <= i < len(names) and str(value).strip() == str(i) else None


def class_names(cfg) -> list[str]:
    return [x.strip() for x in cfg.finetune.labels.split(",") if x.strip()]


def split_records(f, counts: dict, fields: list[str]):
    """(split, where, record) for every record of finetune.train_files and val_files. With val_files the split is
    given; else each training record is hashed to one side by finetune.split_field, or by its `fields`, as
    `kslm prepare` splits documents. A record without its split_field is counted under train and left out."""
    train_files = sources.expand(f.train_files, "finetune.train_files")
    val_files = sources.expand(f.val_files, "finetune.val_files") if f.val_files else []
    for split_fixed, paths in (("train" if val_files else None, train_files), ("val", val_files)):
        for path in paths:
            for where, rec in records_lib.read(path):
                split = split_fixed
                if split is None:
                    if f.split_field and rec.get(f.split_field) in (None, ""):
                        counts["train"][f"missing_{f.split_field}"] += 1
                        continue
                    key = str(rec[f.split_field]) if f.split_field else "\x1f".join(str(rec.get(k)) for k in fields)
                    split = split_of(key, f.val_fraction)
                yield split, where, rec


def build(cfg, sp) -> FinetuneData:
    f = cfg.finetune
    seq_len = cfg.data.seq_len
    names = class_names(cfg) if f.kind == "cls" else []
    bins = parse_bins(f.label_bins, names) if f.kind == "cls" and f.label_bins else []
    if f.kind == "sft":
        tmpl = Template(f.template, sp, "config key finetune.template")
        end_id = tmpl.special_ids[-1] if tmpl.parts[-1][0] == "ids" and tmpl.special_ids else None
    else:
        tmpl, end_id = Template(f.cls_template, sp, "config key finetune.cls_template"), None
    raw = {"train": [], "val": []}
    counts = {"train": collections.Counter(), "val": collections.Counter()}
    groups = {"train": [], "val": []}
    wanted = ([f.prompt_field, f.response_field] if f.kind == "sft" else [f.text_field, f.label_field])
    for split, _, rec in split_records(f, counts, wanted):
        c = counts[split]
        c["records"] += 1
        missing = next((k for k in wanted if not isinstance(rec.get(k), (str, int, float))
                        or str(rec.get(k)).strip() == ""), None)
        if missing:
            c[f"missing_{missing}"] += 1
            continue
        if f.kind == "cls":
            label = label_of(rec[f.label_field], names, bins)
            if label is None:
                c["bad_label"] += 1
                continue
            if label < 0:
                c["outside_label_bins"] += 1
                continue
            raw[split].append((str(rec[f.text_field]), label))
        else:
            raw[split].append((str(rec[f.prompt_field]), str(rec[f.response_field])))
        groups[split].append(str(rec.get(f.split_field, "")))
    if not raw["train"]:
        raise KslmError(f"no usable training example in {f.train_files} (counts: {dict(counts['train'])}); check "
                        f"the field names ({', '.join(wanted)})" + (" and finetune.label_bins" if bins else ""))
    splits = {}
    for s in ("train", "val"):
        if f.kind == "sft":
            splits[s] = sft_split(raw[s], tmpl, sp, seq_len, f.too_long, counts[s], end_id is None)
        else:
            splits[s] = cls_split(raw[s], tmpl, sp, seq_len, f.too_long, counts[s])
        splits[s].groups = [g for g, k in zip(groups[s], splits[s].kept) if k] if f.split_field else []
    return FinetuneData(splits["train"], splits["val"], names, end_id)


def _encode_all(sp, texts: list[str]) -> list[list[int]]:
    return sp.Encode(texts, out_type=int) if texts else []  # threads: one per core


def sft_split(pairs, tmpl: Template, sp, seq_len: int, too_long: str, c, add_eos: bool = False) -> Split:
    """add_eos: a template without a closing special token gets EOS after the response, so answers end."""
    p_ids = _encode_all(sp, [p for p, _ in pairs])
    r_ids = _encode_all(sp, [r for _, r in pairs])
    seqs, flags, prompts, refs, kept = [], [], [], [], []
    for (_, response), pi, ri in zip(pairs, p_ids, r_ids):
        ids, fl, prefix = tmpl.encode({}, {"prompt": pi, "response": ri}, loss_from="response")
        if add_eos:
            ids, fl = ids + [tok_lib.EOS], fl + [1]
        keep = len(ids) - 1 <= seq_len
        if not keep and too_long == "truncate" and prefix + 1 <= seq_len:
            ids, fl, keep = ids[: seq_len + 1], fl[: seq_len + 1], True
            c["truncated"] += 1
        elif not keep:
            c["too_long_dropped"] += 1
        kept.append(keep)
        if keep:
            seqs.append(ids)
            flags.append(fl)
            prompts.append(ids[:prefix])
            refs.append(response)
    c["examples"] = len(seqs)
    return Split(ExampleSet(seqs, flags, None, "lm"), c, prompts, refs, kept=kept)


def cls_split(items, tmpl: Template, sp, seq_len: int, too_long: str, c) -> Split:
    t_ids = _encode_all(sp, [t for t, _ in items])
    seqs, labels, kept = [], [], []
    fixed = sum(len(v) for k, v in tmpl.parts if k == "ids") + 1  # BOS and the template around {text}
    for (_, label), ti in zip(items, t_ids):
        keep = fixed + len(ti) <= seq_len
        if not keep and too_long == "truncate" and fixed < seq_len:
            ti, keep = ti[: seq_len - fixed], True
            c["truncated"] += 1
        elif not keep:
            c["too_long_dropped"] += 1
        kept.append(keep)
        if keep:
            seqs.append(tmpl.encode({}, {"text": ti})[0])
            labels.append(label)
    c["examples"] = len(seqs)
    return Split(ExampleSet(seqs, None, labels, "cls"), c, [], labels, kept=kept)
