"""Configs as the commands use them: recipe files, `--config.x.y=v` overrides, the workdir copy and the
rules for which keys a resumed run may change. The schema itself (keys, defaults, validation) is in
config_schema.py; its names are re-exported here, so `kslm_jax.core.config` is the one import recipes need.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import re
import traceback
from pathlib import Path

import ml_collections

from kslm_jax.core.config_checks import same_value
from kslm_jax.core.config_schema import base_config, d_ff, head_dim, padded_vocab, validate  # noqa: F401
from kslm_jax.core.errors import KslmError

__all__ = ["base_config", "d_ff", "head_dim", "padded_vocab", "validate", "load", "resolve_recipe",
           "apply_override", "parse_value", "HARMLESS", "DATA_DEFINING", "to_dict", "flat", "from_dict",
           "breaking_differences", "read_workdir_config"]


def load(path: str | None, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Load a recipe file (a Python file with get_config()) and apply `a.b=v` overrides."""
    cfg = base_config() if path is None else _load_file(path)
    for item in overrides:
        apply_override(cfg, item)
    if cfg.finetune.init_from:
        inherit_base(cfg)
    validate(cfg)
    return cfg


def resolve_recipe(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    # `--config tiny_ko` finds configs/tiny_ko.py beside the package in a source checkout.
    repo = Path(__file__).resolve().parents[2] / "configs" / f"{p.stem}.py"
    if p.suffix in ("", ".py") and "/" not in path and repo.is_file():
        return repo
    raise KslmError(f"config file {path} not found; pass a recipe such as configs/tiny_ko.py")


def _load_file(path: str) -> ml_collections.ConfigDict:
    p = resolve_recipe(path)
    # A recipe is Python code the user chose to run, like a training script; command-line values never are.
    spec = importlib.util.spec_from_file_location(f"kslm_recipe_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise KslmError(f"config file {p}: defines no get_config(); a recipe returns base_config() modified")
        cfg = module.get_config()
    except KslmError:
        raise
    except SyntaxError as e:  # the file's own line, not the importer's
        raise KslmError(f"{e.filename or p}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the recipe is user code: any failure is one line at its own line
        raise KslmError(_recipe_error(p, e)) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise KslmError(f"config file {p}: get_config() must return kslm_jax.core.config.base_config() modified")
    return cfg


def _recipe_error(p: Path, e: Exception) -> str:
    """`file:line: message` for an exception raised while running recipe `p`; an unknown key names its section
    and the nearest known keys instead of ml_collections' repr of the whole section."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve() == p.resolve()]
    where = f"{p}:{ours[-1].lineno}" if ours else str(p)
    section = _failing_section(e)
    if section is not None and isinstance(e, (AttributeError, KeyError)):
        name = _missing_name(e)
        if name:
            return f"{where}: {unknown_key_message(section, name)}"
    first = (str(e).splitlines() or [""])[0].strip().strip("'\"")[:300]
    return f"{where}: {type(e).__name__}: {first}" if first else f"{where}: {type(e).__name__}"


def _missing_name(e: Exception) -> str | None:
    text = str(e)
    m = re.search(r'Key "([^"]+)" does not exist', text) or re.search(r"""['"]([A-Za-z_]\w*)\\?['"]""", text)
    return m.group(1) if m else None


def _failing_section(e: Exception) -> str | None:
    """The dotted path of the ConfigDict that refused a key (its innermost `self` in the traceback), found by
    its key set among base_config()'s sections; "" is the top level."""
    tb, node = e.__traceback__, None
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, ml_collections.ConfigDict):
            node = obj
        tb = tb.tb_next
    if node is None:
        return None
    keys = set(node.keys())
    for path, section in _sections(base_config(), "").items():
        if set(section.keys()) == keys:
            return path
    return None


def _sections(node, prefix: str) -> dict:
    out = {prefix: node}
    for k, v in node.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_sections(v, f"{prefix}{k}."))
    return out


def unknown_key_message(section: str, name: str, key: str | None = None) -> str:
    """One line for an unknown key or section (`key`: the whole dotted name asked for): the nearest known
    names (difflib), and for a section all of them."""
    sections = _sections(base_config(), "")
    known = list(sections[section].keys()) if section in sections else []
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(section + c) for c in close)}?" if close else ""
    if not section:
        head = f"unknown config section {name!r}" if key in (None, name) else \
            f"unknown config key {key!r}: no section {name!r}"
        return f"{head}{hint} (sections: {', '.join(known)})"
    listing = "" if close or not known else f" (known in {section[:-1]}: {', '.join(sorted(known))})"
    return f"unknown config key {key or section + name!r}{hint}{listing}"


def apply_override(cfg, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep:
        raise KslmError(f"override {item!r} needs the form --config.section.key=value")
    parts = key.split(".")
    node, section = cfg, ""
    for part in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise KslmError(unknown_key_message(section, part, key))
        node, section = node[part], f"{section}{part}."
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KslmError(unknown_key_message(section, leaf, key))
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise KslmError(f"config key {key!r} is a section; set one of its keys instead")
    value = parse_value(key, raw, old)
    with node.unlocked():
        node[leaf] = value


def parse_value(key: str, raw: str, old):
    """Parse a command-line value as the type of the field it replaces; literals only, never code."""
    try:
        if isinstance(old, bool):
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
        if isinstance(old, str):
            return raw
        value = ast.literal_eval(raw)
        if not isinstance(value, type(old)):
            raise ValueError
        return value
    except (ValueError, SyntaxError):
        raise KslmError(f"config key {key!r}: cannot read {raw!r} as {type(old).__name__}") from None


# Keys a resumed run may change: they steer logging and scheduling, not the trajectory of the weights.
HARMLESS = ("distill.cache",  # checked batch by batch against the teacher outputs it stands for
            "logging.", "checkpoint.", "train.log_every", "train.eval_every", "train.eval_batches", "train.steps",
            "train.step_timeout_s", "train.nonfinite", "train.spike_zscore",
            "train.max_skipped_steps", "train.debug_nans", "generate.", "data.workers", "mesh.",
            "data.prepare_workers", "data.verify_shards", "eval.", "finetune.eval_", "finetune.max_new_tokens",
            "data.tokenize_workers", "data.cache_mb")


def to_dict(cfg) -> dict:
    return json.loads(cfg.to_json())


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def from_dict(d: dict) -> ml_collections.ConfigDict:
    cfg = base_config()
    for key, value in flat(d).items():
        if isinstance(value, list):
            value = tuple(value)
        apply_override(cfg, f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    validate(cfg)
    return cfg


# Keys that define the prepared corpus and tokenizer; before a run has a checkpoint only these are fixed.
DATA_DEFINING = ("tokenizer.", "data.sources", "data.text_mode", "data.text_field", "data.val_fraction",
                 "data.split_field",
                 "data.min_chars", "data.min_hangul_ratio", "data.max_chars", "data.max_symbol_ratio",
                 "data.max_dup_line_ratio", "data.max_top_2gram_ratio", "data.max_top_3gram_ratio",
                 "data.max_top_4gram_ratio", "data.max_repeat", "data.email_action", "data.url_action",
                 "data.rrn_action", "data.card_action", "data.phone_action", "data.dedup.")


def breaking_differences(old: dict, new: dict, trained: bool = True) -> list[str]:
    """Keys whose change would break the run: any non-harmless key once it has a checkpoint, else only
    the keys that define its prepared data (model, optimizer and schedule are still free to change)."""
    # A key added to the schema after the run began has its default there, not a difference.
    a, b = {**flat(to_dict(base_config())), **flat(old)}, flat(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if same_value(a.get(key), b.get(key)) or any(key.startswith(h) for h in HARMLESS):
            continue
        if trained or any(key.startswith(d) for d in DATA_DEFINING):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def read_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise KslmError(f"{path} not found: pass --config, or point --workdir at a run made by kslm")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise KslmError(f"{path} is not valid JSON ({e}); restore it or start a new workdir") from None
    if not isinstance(d, dict):
        raise KslmError(f"{path} holds a JSON {type(d).__name__}, not a config object; restore it or start a new workdir")
    return from_dict(d)


# Keys a fine-tuning run takes from finetune.init_from: the weights it loads fix the model's shape and tokenizer.
INHERITED = ("model.arch", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim",
             "model.d_ff", "model.vocab_multiple", "model.rope_theta", "model.norm_eps", "model.tie_embeddings",
             "model.scan_layers", "tokenizer.")


def inherit_base(cfg) -> None:
    """Set the shape and tokenizer keys of `cfg` to those of its finetune.init_from workdir."""
    base = Path(cfg.finetune.init_from)
    if not (base / "config.json").is_file():
        raise KslmError(f"config key finetune.init_from={cfg.finetune.init_from}: no config.json there; point it at a "
                        "workdir trained (or imported) by kslm")
    theirs = flat(to_dict(read_workdir_config(base)))
    for key, value in theirs.items():
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in INHERITED):
            section, name = key.split(".", 1)
            with cfg[section].unlocked():
                cfg[section][name] = value
