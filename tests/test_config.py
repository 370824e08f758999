"""The config schema: recipes, `a.b=v` overrides, validation, the workdir's config.json and its round trip.

All in-process and fast: nothing here imports a model or trains.
"""
import json
from pathlib import Path

import pytest

from kslm_jax.core import config as config_lib
from kslm_jax.core import config_schema
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").glob("*.py"))


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_recipes():
    assert RECIPES, f"no recipes under {REPO / 'configs'}"


# ---------------------------------------------------------------- recipes

@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_loads_and_validates(path):
    cfg = config_lib.load(str(path))
    config_lib.validate(cfg)  # load() validates already; a second call must agree
    # A recipe is base_config() modified: exactly the same keys.
    assert set(config_lib.flat(config_lib.to_dict(cfg))) == set(
        config_lib.flat(config_lib.to_dict(config_lib.base_config())))


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_round_trips_through_dict(path):
    cfg = config_lib.load(str(path))
    d = config_lib.to_dict(cfg)
    back = config_lib.from_dict(d)
    assert config_lib.to_dict(back) == d
    # and through JSON text, as the workdir stores it
    again = config_lib.from_dict(json.loads(json.dumps(d, ensure_ascii=False)))
    assert config_lib.to_dict(again) == d


def test_base_config_round_trips_and_validates():
    cfg = config_lib.load(None)
    assert config_lib.to_dict(config_lib.from_dict(config_lib.to_dict(cfg))) == config_lib.to_dict(cfg)


def test_round_trip_keeps_overridden_values():
    cfg = config_lib.load(str(REPO / "configs" / "tiny_ko.py"), [
        "data.sources=a/*.txt,b/*.jsonl.gz", "optim.lr=1e-4", "model.tie_embeddings=false", "train.steps=7"])
    back = config_lib.from_dict(config_lib.to_dict(cfg))
    assert config_lib.to_dict(back) == config_lib.to_dict(cfg)
    assert back.data.sources == "a/*.txt,b/*.jsonl.gz"
    assert back.optim.lr == pytest.approx(1e-4)
    assert back.model.tie_embeddings is False
    assert back.train.steps == 7


def test_recipe_by_short_name_resolves_to_configs_folder():
    assert config_lib.resolve_recipe("tiny_ko") == REPO / "configs" / "tiny_ko.py"


def _write_recipe(tmp_path, body, name="recipe.py"):
    path = tmp_path / name
    path.write_text("from kslm_jax.core.config import base_config\n\n\ndef get_config():\n" + body, encoding="utf-8")
    return path


def test_recipe_with_unknown_key_names_the_file(tmp_path):
    path = _write_recipe(tmp_path, " c=base_config(); c.model.foo=1; return c\n")
    with pytest.raises(KslmError) as e:
        config_lib.load(str(path))
    assert str(path) in str(e.value)
    assert "foo" in str(e.value)


def test_recipe_with_unknown_key_by_item_names_the_file(tmp_path):
    path = _write_recipe(tmp_path, " c=base_config(); c.model['foo']=1; return c\n")
    with pytest.raises(KslmError) as e:
        config_lib.load(str(path))
    assert str(path) in str(e.value)
    assert "foo" in str(e.value)


def test_recipe_with_wrong_type_names_the_file(tmp_path):
    path = _write_recipe(tmp_path, " c=base_config(); c.model.n_layers='four'; return c\n")
    with pytest.raises(KslmError) as e:
        config_lib.load(str(path))
    assert str(path) in str(e.value)
    assert "n_layers" in str(e.value)


def test_recipe_without_get_config_names_the_file(tmp_path):
    path = tmp_path / "empty_recipe.py"
    path.write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(KslmError) as e:
        config_lib.load(str(path))
    assert str(path) in str(e.value)


def test_recipe_returning_a_dict_names_the_file(tmp_path):
    path = tmp_path / "dict_recipe.py"
    path.write_text("def get_config():\n    return {'model': {}}\n", encoding="utf-8")
    with pytest.raises(KslmError) as e:
        config_lib.load(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["missing.py", "nowhere/missing.py", "does_not_exist"])
def test_missing_recipe_names_the_file(name):
    with pytest.raises(KslmError) as e:
        config_lib.load(name)
    assert name in str(e.value)


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize("item, key, expected", [
    ("model.n_layers=7", "model.n_layers", 7),
    ("model.n_layers= 7 ", "model.n_layers", 7),
    ("train.steps=0", "train.steps", 0),
    ("mesh.data=-1", "mesh.data", -1),
    ("optim.lr=0.5", "optim.lr", 0.5),
    ("optim.lr=1e-3", "optim.lr", 1e-3),
    ("optim.lr=2", "optim.lr", 2.0),
    ("model.tie_embeddings=true", "model.tie_embeddings", True),
    ("model.tie_embeddings=True", "model.tie_embeddings", True),
    ("model.tie_embeddings=1", "model.tie_embeddings", True),
    ("model.tie_embeddings=yes", "model.tie_embeddings", True),
    ("model.scan_layers=false", "model.scan_layers", False),
    ("model.scan_layers=FALSE", "model.scan_layers", False),
    ("model.scan_layers=0", "model.scan_layers", False),
    ("model.scan_layers=no", "model.scan_layers", False),
    ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
    ("data.sources=corpus/*.jsonl.gz", "data.sources", "corpus/*.jsonl.gz"),
    ("data.sources=a=b,c", "data.sources", "a=b,c"),
    ("data.sources=", "data.sources", ""),
    ("data.text_field=meta.body", "data.text_field", "meta.body"),
])
def test_override_parses_the_field_type(item, key, expected):
    cfg = config_lib.base_config()
    config_lib.apply_override(cfg, item)
    value = config_schema._get(cfg, key)
    assert value == expected
    assert type(value) is type(expected)


def test_load_applies_overrides_on_top_of_recipe():
    path = REPO / "configs" / "tiny_ko.py"
    plain = config_lib.load(str(path))
    cfg = config_lib.load(str(path), ["model.n_layers=3", "optim.lr=1e-4", "data.sources=x.txt"])
    assert cfg.model.n_layers == 3
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.sources == "x.txt"
    # everything else still comes from the recipe
    a, b = config_lib.flat(config_lib.to_dict(plain)), config_lib.flat(config_lib.to_dict(cfg))
    assert {k for k in a if a[k] != b[k]} == {"model.n_layers", "optim.lr", "data.sources"}


def test_later_override_wins():
    cfg = config_lib.load(None, ["train.steps=5", "train.steps=9"])
    assert cfg.train.steps == 9


@pytest.mark.parametrize("item, key", [
    ("model.n_layerz=3", "model.n_layerz"),
    ("modle.n_layers=3", "modle.n_layers"),
    ("nope=1", "nope"),
    ("model.d_model.x=1", "model.d_model.x"),
    ("train.steps.x.y=1", "train.steps.x.y"),
])
def test_unknown_key_names_it(item, key):
    cfg = config_lib.base_config()
    with pytest.raises(KslmError) as e:
        config_lib.apply_override(cfg, item)
    assert key in str(e.value)
    with pytest.raises(KslmError) as e:
        config_lib.load(None, [item])
    assert key in str(e.value)


@pytest.mark.parametrize("item, key", [
    ("model.n_layers=abc", "model.n_layers"),
    ("model.n_layers=3.0", "model.n_layers"),
    ("model.n_layers=", "model.n_layers"),
    ("model.n_layers=true", "model.n_layers"),
    ("train.steps=many", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings"),
    ("model.tie_embeddings=2", "model.tie_embeddings"),
    ("model.tie_embeddings=", "model.tie_embeddings"),
])
def test_wrong_type_names_the_key(item, key):
    cfg = config_lib.base_config()
    before = config_lib.to_dict(cfg)
    with pytest.raises(KslmError) as e:
        config_lib.apply_override(cfg, item)
    assert key in str(e.value)
    assert config_lib.to_dict(cfg) == before  # a refused override changes nothing


@pytest.mark.parametrize("item", ["model=3", "model={}", "train=dict(steps=1)"])
def test_override_of_a_section_errors(item):
    cfg = config_lib.base_config()
    before = config_lib.to_dict(cfg)
    with pytest.raises(KslmError) as e:
        config_lib.apply_override(cfg, item)
    assert item.partition("=")[0] in str(e.value)
    assert config_lib.to_dict(cfg) == before


@pytest.mark.parametrize("item", ["model.n_layers", "", "model"])
def test_override_without_value_errors(item):
    with pytest.raises(KslmError):
        config_lib.apply_override(config_lib.base_config(), item)


@pytest.mark.parametrize("raw", [
    "__import__('os').getcwd()",
    "__import__('os').system('exit 1')",
    "open('/etc/passwd').read()",
    "[1, 2, 3]",
    "{'a': 1}",
])
def test_override_values_are_literals_not_code(raw):
    cfg = config_lib.load(None, [f"data.sources={raw}"])
    assert cfg.data.sources == raw
    assert isinstance(cfg.data.sources, str)


@pytest.mark.parametrize("item", ["model.n_layers=1+1", "model.n_layers=len('abc')", "optim.lr=1/2",
                                  "model.tie_embeddings=not False", "model.tie_embeddings=bool(1)"])
def test_expressions_are_not_evaluated_for_typed_fields(item):
    with pytest.raises(KslmError) as e:
        config_lib.apply_override(config_lib.base_config(), item)
    assert item.partition("=")[0] in str(e.value)


# ---------------------------------------------------------------- validate

def _cfg(*overrides):
    cfg = config_lib.base_config()
    for item in overrides:
        config_lib.apply_override(cfg, item)
    return cfg


def test_validate_accepts_base_config():
    config_lib.validate(config_lib.base_config())


def test_validate_kv_heads_must_divide_heads():
    cfg = _cfg("model.n_heads=4", "model.n_kv_heads=3")
    with pytest.raises(KslmError) as e:
        config_lib.validate(cfg)
    assert "model.n_heads" in str(e.value) and "model.n_kv_heads" in str(e.value)
    with pytest.raises(KslmError):
        config_lib.load(None, ["model.n_heads=4", "model.n_kv_heads=3"])


def test_validate_grad_accum_must_divide_batch():
    cfg = _cfg("train.batch_size=16", "train.grad_accum=3")
    with pytest.raises(KslmError) as e:
        config_lib.validate(cfg)
    assert "train.batch_size" in str(e.value) and "train.grad_accum" in str(e.value)
    config_lib.validate(_cfg("train.batch_size=16", "train.grad_accum=4"))


def test_validate_unknown_attention():
    cfg = _cfg("model.attention=flash")
    with pytest.raises(KslmError) as e:
        config_lib.validate(cfg)
    assert "model.attention" in str(e.value) and "flash" in str(e.value)
    with pytest.raises(KslmError):
        config_lib.load(None, ["model.attention=flash"])


@pytest.mark.parametrize("item, key", [
    ("model.dtype=float16", "model.dtype"),
    ("model.remat=some", "model.remat"),
    ("tokenizer.model_type=wordpiece", "tokenizer.model_type"),
    ("data.text_mode=sentence", "data.text_mode"),
    ("model.d_model=0", "model.d_model"),
    ("data.seq_len=-1", "data.seq_len"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=-0.1", "data.val_fraction"),
    ("model.d_model=102", "model.d_model"),  # 102 does not divide by 4 heads
])
def test_validate_rejects_bad_values(item, key):
    with pytest.raises(KslmError) as e:
        config_lib.load(None, [item])
    assert key in str(e.value)


def test_head_dim_makes_indivisible_width_valid():
    config_lib.load(None, ["model.d_model=102", "model.head_dim=32"])


# ---------------------------------------------------------------- workdir.bind

def test_first_bind_writes_config_json(tmp_path):
    wd = tmp_path / "run"
    cfg = config_lib.load(str(REPO / "configs" / "tiny_ko.py"))
    assert workdir_lib.bind(wd, cfg) == wd
    path = wd / "config.json"
    assert path.is_file()
    assert json.loads(path.read_text(encoding="utf-8")) == config_lib.to_dict(cfg)
    assert config_lib.to_dict(config_lib.read_workdir_config(wd)) == config_lib.to_dict(cfg)
    assert not [p for p in wd.iterdir() if p.name != "config.json"]  # no temporary files left behind


def test_rebind_same_config_is_accepted(tmp_path):
    cfg = config_lib.load(str(REPO / "configs" / "tiny_ko.py"))
    workdir_lib.bind(tmp_path, cfg)
    before = (tmp_path / "config.json").read_bytes()
    workdir_lib.bind(tmp_path, config_lib.load(str(REPO / "configs" / "tiny_ko.py")))
    assert (tmp_path / "config.json").read_bytes() == before


def test_breaking_change_is_refused_and_config_kept(tmp_path):
    path = tmp_path / "config.json"
    workdir_lib.bind(tmp_path, _cfg("model.d_model=64"))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # the run has trained: its shape is fixed now
    before = path.read_bytes()
    with pytest.raises(KslmError) as e:
        workdir_lib.bind(tmp_path, _cfg("model.d_model=96", "train.steps=5"))
    msg = str(e.value)
    assert "model.d_model" in msg
    assert "train.steps" not in msg  # harmless keys are not listed as conflicts
    assert str(tmp_path) in msg
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.json"]


def test_before_any_checkpoint_only_data_keys_are_fixed(tmp_path):
    workdir_lib.bind(tmp_path, _cfg("model.d_model=64"))
    (tmp_path / "data" / "clean").mkdir(parents=True)  # prepared: a config beside nothing is a failed command's
    workdir_lib.bind(tmp_path, _cfg("model.d_model=96", "optim.lr=0.01"))  # nothing trained yet: allowed
    with pytest.raises(KslmError, match="tokenizer.vocab_size"):
        workdir_lib.bind(tmp_path, _cfg("model.d_model=96", "optim.lr=0.01", "tokenizer.vocab_size=500"))


def test_breaking_change_lists_every_differing_key(tmp_path):
    workdir_lib.bind(tmp_path, _cfg())
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(KslmError) as e:
        workdir_lib.bind(tmp_path, _cfg("model.d_model=128", "tokenizer.vocab_size=500", "optim.lr=0.1"))
    for key in ("model.d_model", "tokenizer.vocab_size", "optim.lr"):
        assert key in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["train.log_every=3"],
    ["train.steps=12345"],
    ["train.log_every=3", "train.steps=12345", "train.eval_every=7", "logging.progress_bar=false",
     "checkpoint.keep=1", "generate.temperature=0.1", "data.workers=2", "mesh.data=1"],
])
def test_harmless_change_is_accepted(tmp_path, overrides):
    workdir_lib.bind(tmp_path, _cfg())
    new = _cfg(*overrides)
    workdir_lib.bind(tmp_path, new)
    assert json.loads((tmp_path / "config.json").read_text(encoding="utf-8")) == config_lib.to_dict(new)


def test_force_overwrites(tmp_path):
    workdir_lib.bind(tmp_path, _cfg("model.d_model=64"))
    new = _cfg("model.d_model=96")
    workdir_lib.bind(tmp_path, new, force=True)
    stored = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert stored["model"]["d_model"] == 96
    assert stored == config_lib.to_dict(new)


def test_corrupt_config_json_is_a_kslm_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(KslmError) as e:
        workdir_lib.bind(tmp_path, _cfg())
    assert "config.json" in str(e.value)
    assert (tmp_path / "config.json").read_text(encoding="utf-8") == "{not json"
    with pytest.raises(KslmError):
        config_lib.read_workdir_config(tmp_path)


def test_bind_under_a_file_names_the_workdir(tmp_path):
    (tmp_path / "afile").write_text("x")
    wd = tmp_path / "afile" / "run"
    with pytest.raises(KslmError) as e:
        workdir_lib.bind(wd, _cfg())
    assert str(wd) in str(e.value)


def test_config_for_reads_workdir_config_and_applies_overrides(tmp_path):
    workdir_lib.bind(tmp_path, config_lib.load(str(REPO / "configs" / "tiny_ko.py")))
    cfg = workdir_lib.config_for(tmp_path, None, ["train.steps=3"])
    assert cfg.train.steps == 3
    assert cfg.model.d_model == 128  # from the stored tiny_ko config, not base_config's 256
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(KslmError) as e:
        workdir_lib.config_for(tmp_path, None, ["model.d_model=64"])
    assert "model.d_model" in str(e.value)


def test_read_workdir_config_missing(tmp_path):
    with pytest.raises(KslmError) as e:
        config_lib.read_workdir_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
