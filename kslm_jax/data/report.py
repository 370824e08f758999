"""What `kslm prepare` did, per rule and per source: the tally the workers fill and the table the CLI prints."""
from __future__ import annotations

import difflib

from kslm_jax.data import clean, filters

EXAMPLES = 3
DEDUP_RULES = ("exact_duplicate", "near_duplicate")


class Tally:
    """rule → source → [documents, characters, examples]. Chunks are merged in input order, so the examples
    (the first few per rule and source) do not depend on how many workers cleaned them."""

    def __init__(self):
        self.rules: dict[str, dict[str, list]] = {}

    def add(self, rule: str, source: str, docs: int, chars: int, examples=()) -> None:
        entry = self.rules.setdefault(rule, {}).setdefault(source, [0, 0, []])
        entry[0] += docs
        entry[1] += chars
        if len(entry[2]) < EXAMPLES:
            entry[2].extend(examples[:EXAMPLES - len(entry[2])])

    def merge(self, other: "Tally") -> None:
        for rule, by_source in other.rules.items():
            for source, (docs, chars, examples) in by_source.items():
                self.add(rule, source, docs, chars, examples)

    def wants_example(self, rule: str, source: str) -> bool:
        entry = self.rules.get(rule, {}).get(source)
        return entry is None or len(entry[2]) < EXAMPLES

    def rule_report(self, drop_rules) -> dict:
        """{rule: {kind, documents, characters, examples, per_source: {source: {documents, characters, examples}}}};
        kind is "drop" for the rules in `drop_rules` (filters, dedup, PII rules set to drop), else "edit"."""
        out = {}
        for rule in sorted(self.rules, key=_rule_order):
            by_source = self.rules[rule]
            examples = [e for _, _, ex in by_source.values() for e in ex][:EXAMPLES]
            out[rule] = dict(kind="drop" if rule in drop_rules else "edit",
                             documents=sum(v[0] for v in by_source.values()),
                             characters=sum(v[1] for v in by_source.values()), examples=examples,
                             per_source={s: dict(documents=v[0], characters=v[1], examples=v[2])
                                         for s, v in by_source.items()})
        return out


def _rule_order(rule: str) -> tuple:
    order = clean.EDIT_RULES + filters.FILTERS + DEDUP_RULES
    return (order.index(rule) if rule in order else len(order), rule)


def _num(n: int) -> str:
    return f"{n:>12,d}"


def _quote(examples) -> str:
    return " | ".join(f"“{e}”" for e in examples)


def format_report(report: dict) -> str:
    """The table `kslm prepare` prints: documents and characters in and out, per rule and per source."""
    w = 30
    lines = ["(cleaned = documents a rule changed, characters it removed or replaced; "
             "dropped = documents removed, their characters)",
             f"{'':{w}s}{'documents':>12s}{'characters':>14s}",
             f"{'read (' + str(report['files']) + ' files)':{w}s}{_num(report['docs_in'])}  {_num(report['chars_in'])}"]
    for rule, r in report["rules"].items():
        label = ("dropped: " if r["kind"] == "drop" else "cleaned: ") + rule
        extra = ""
        if rule in DEDUP_RULES:
            extra = f"   {report['dedup'][rule.split('_')[0]]['clusters']:,} clusters"
        lines.append(f"{label:{w}s}{_num(r['documents'])}  {_num(r['characters'])}{extra}")
        if r["examples"]:
            lines.append(f"{'':4s}e.g. {_quote(r['examples'])}")
    for split in ("train", "val"):
        lines.append(f"{'kept: ' + split:{w}s}{_num(report['docs_out'][split])}  {_num(report['chars_out'][split])}")
    reading = {k: v for k, v in report["cleaning"].items() if k not in clean.EDIT_RULES and v}
    if reading:
        lines.append("reading: " + ", ".join(f"{k}={v:,}" for k, v in sorted(reading.items())))
    near = report["dedup"].get("near")
    if near and near.get("enabled"):
        lines.append(f"near-duplicates: MinHash over character {near['ngram']}-grams, {near['bands']} bands × "
                     f"{near['rows']} rows (Jaccard threshold ≈ {near['threshold']:.2f})")
    if len(report["per_source"]) > 1:
        lines.append(f"{'source':{w}s}{'docs in':>12s}{'docs out':>12s}{'chars in':>14s}{'chars out':>14s}")
        for source, s in report["per_source"].items():
            name = source if len(source) <= w - 2 else "…" + source[-(w - 3):]
            lines.append(f"{name:{w}s}{s['docs_in']:>12,d}{s['docs_out']:>12,d}{s['chars_in']:>14,d}{s['chars_out']:>14,d}")
    for info in report.get("fields", {}).values():
        lines.append("warning: " + field_note(info))
    problems = {f: {k: v for k, v in c.items() if k != "docs"} for f, c in report.get("read_per_file", {}).items()}
    for f, counts in problems.items():
        if counts:
            lines.append(f"read problems in {f}: " + ", ".join(f"{k}={v:,}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def field_note(info: dict) -> str:
    """`data.text_field 'body' is missing from all 36,315 records; keys of the first 2,000: id (2,000), ...`"""
    share = "all" if info["missing"] == info["records"] else f"{info['missing']:,} of"
    keys = info["keys"]
    listing = ", ".join(f"{k} ({n:,})" for k, n in keys.items()) or "none (the records are not JSON objects)"
    close = difflib.get_close_matches(info["field"], list(keys), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (f"{info['name']} {info['field']!r} is missing from {share} {info['records']:,} records; "
            f"keys of the first {info['sampled']:,}: {listing}{hint}")


def missing_field_error(info: dict, n_files: int) -> str:
    return (f"no documents read from {n_files} file(s) of data.sources: " + field_note(info)
            + "; set --config.data.text_field=KEY (jsonl/json: a key, a.b for nested; csv/tsv/parquet: a column)")
