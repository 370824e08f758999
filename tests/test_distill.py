"""Distillation and pruning on the tiny corpus: online KD, the offline top-k cache, HF teachers, tokenizer
checks, `kslm prune` then `kslm train` from the pruned student."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import committed_steps
from cli_inproc import kslm
from extras import needs

from kslm_jax.cli import commands
from kslm_jax.compress import prune
from kslm_jax.core import checkpoint, sharding
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import pipeline
from kslm_jax.model import llama
from kslm_jax.objectives import distill, distill_cache, finetune_io, lm, student
from kslm_jax.objectives import teacher as teacher_lib
from kslm_jax.train import step as step_lib

STUDENT = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
           "checkpoint.every_steps=1000"]


def _copy(prepared, dst):
    shutil.copytree(prepared, dst)
    return dst


@pytest.fixture(scope="module")
def teacher(trained_tiny):
    """The suite's TINY model trained for 20 steps (read only here): better than chance, so its predictions
    carry signal."""
    return trained_tiny.workdir


def _student(wd, teacher_wd, *overrides):
    cfg = workdir_lib.config_for(wd, None, [*STUDENT, f"distill.teacher={teacher_wd}", *overrides], force=True)
    return student.trainer(cfg, wd)


def _metrics(wd):
    rows = [json.loads(line) for line in (Path(wd) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def _restored(trainer):
    with jax.set_mesh(trainer.mesh):
        step, trainer.state = checkpoint.restore_params(trainer.paths["checkpoints"], trainer.abstract)
    return step


@pytest.fixture(scope="module")
def pruned(teacher, tmp_path_factory):
    """`kslm prune` of the teacher to one layer of 48 channels, 2 query heads on 1 KV head, 96 MLP channels."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    args = SimpleNamespace(teacher=str(teacher), workdir=str(out), config=None, force=False, keep_layers=None,
                           n_layers=1, drop_layers_by="importance", d_model=48, d_ff=96, n_heads=2, n_kv_heads=1,
                           calib_batches=2)
    commands.prune(args, [f"distill.teacher={teacher}", "checkpoint.every_steps=1000"])
    return out


def test_pruned_model_restores_and_beats_random_init(pruned):
    report = json.loads((pruned / "prune.json").read_text())
    assert report["shape"] == {"d_model": 48, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 96}
    assert report["params"]["student"] < report["params"]["teacher"] / 1.5
    cfg = config_lib.read_workdir_config(pruned)  # validates
    assert (cfg.model.d_model, cfg.model.head_dim, cfg.model.d_ff) == (48, 16, 96)
    t = lm.trainer(cfg, pruned)
    assert _restored(t) == 0
    after_prune = t.evaluate()
    # A random initialization of the same shape, drawn as the model's initializers draw it.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: np.ones(a.shape, np.float32) if path[-1].key == "scale"
        else rng.normal(0.0, cfg.model.init_std, a.shape).astype(np.float32), t.abstract.params)
    t.state = t.state.replace(params=jax.device_put(params, t.shardings.params))
    random_init = t.evaluate()
    assert np.isfinite(after_prune["loss"]) and after_prune["loss"] < random_init["loss"] - 0.3


def test_calibration_forward_reproduces_the_model(teacher):
    from kslm_jax.compress import importance
    cfg = config_lib.read_workdir_config(teacher)
    params = finetune_io.restore_params_host(config_lib.read_workdir_config(teacher), teacher)
    c = llama.ModelConfig.from_config(cfg)
    batch = next(iter(pipeline.train_dataset(workdir_lib.paths(teacher)["tokens"], cfg.data, cfg.train.batch_size)))
    logits, scores = importance.forward(params, c, batch)
    model = llama.Transformer(c)
    want = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"]))(
        params, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=2e-4)
    assert len(scores["bi"]) == c.n_layers and scores["head"][0].shape == (c.n_heads,)
    assert scores["mlp"][0].shape == (c.d_ff,) and scores["emb"].shape == (c.d_model,)
    assert all(0.0 < float(b) < 2.0 for b in scores["bi"])


def test_layer_and_head_selection():
    assert prune.select_layers(12, None, n_layers=6, by="every_other") == [0, 2, 4, 6, 8, 10]
    assert prune.select_layers(4, np.array([0.3, 0.1, 0.5, 0.2]), n_layers=2) == [0, 2]
    assert prune.select_layers(4, None, keep=[3, 1]) == [1, 3]
    with pytest.raises(KslmError, match="layers are 0..3"):
        prune.select_layers(4, None, keep=[4])
    # 8 query heads in 4 KV groups of 2 -> 2 KV groups: the two strongest groups (by summed head scores),
    # then the best heads inside each; heads stay listed group by group, so head j uses KV head j // group.
    scores = np.array([1.0, 5.0, 0.1, 0.2, 3.0, 3.5, 0.3, 0.0])
    heads, kv = prune.select_heads(scores, 4, 2, 2)
    assert kv.tolist() == [0, 2] and heads.tolist() == [1, 5]
    heads, kv = prune.select_heads(scores, 4, 4, 2)
    assert kv.tolist() == [0, 2] and heads.tolist() == [0, 1, 4, 5]


def test_teacher_is_sharded_on_the_students_mesh(teacher, prepared, tmp_path):
    wd = _copy(prepared, tmp_path / "student")
    t = _student(wd, teacher, "model.n_kv_heads=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
    q = t.extra["teacher"]["layers"]["self_attn"]["q_proj"]["kernel"]   # (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.sharding.mesh.shape == t.mesh.shape
    assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (2, 32, 2, 16)


def test_resumed_student_keeps_the_teacher_step_it_started_with(teacher, prepared, tmp_path):
    """A teacher that trains on after the student began does not change what a resumed student sees; a pinned
    step that is gone is one error; a new student takes the newest step."""
    t_wd = shutil.copytree(teacher, tmp_path / "teacher")
    first = _student(_copy(prepared, tmp_path / "student"), t_wd)
    assert first.objective.teacher_step == 20
    assert json.loads((tmp_path / "student" / student.TEACHER_PIN).read_text())["step"] == 20
    more = workdir_lib.config_for(t_wd, None, ["train.steps=22", "checkpoint.every_steps=22"], force=True)
    lm.trainer(more, t_wd).fit()
    assert 22 in committed_steps(t_wd)
    again = _student(tmp_path / "student", t_wd)
    assert again.objective.teacher_step == 20
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), first.extra, again.extra)
    assert all(jax.tree.leaves(same))
    assert _student(_copy(prepared, tmp_path / "fresh"), t_wd).objective.teacher_step == 22
    shutil.rmtree(t_wd / "checkpoints" / "20")
    with pytest.raises(KslmError, match="started with the teacher's checkpoint step 20"):
        _student(tmp_path / "student", t_wd)


@pytest.fixture(scope="module")
def offline(pruned, tmp_path_factory):
    """`kslm train` on the pruned student (its config names the teacher): eight steps of top-k distillation
    online, and the same run from a float32 cache of the teacher, stopped by SIGTERM after step 4 and resumed."""
    common = ["train.steps=8", "distill.topk=16", "distill.loss=jsd", "distill.beta=0.3", "distill.temperature=1.5",
              "distill.alpha=1.0"]
    online = _copy(pruned, tmp_path_factory.mktemp("online") / "run")
    commands.train(SimpleNamespace(workdir=str(online), config=None, force=True), common)
    cached = _copy(pruned, tmp_path_factory.mktemp("cached") / "run")
    commands.distill_cache(SimpleNamespace(workdir=str(cached), config=None, force=True, dtype="float32"), common)
    cfg = workdir_lib.config_for(cached, None, [*common, "distill.cache=distill_cache"], force=True)
    run = student.trainer(cfg, cached)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSLM_FAULT_SIGTERM_AT_STEP", "4")
        stopped = run.fit()
    assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 4
    run.state = None  # weights and data iterator come back from the step-4 checkpoint (one compile, not two)
    run.fit()
    assert run.start_step == 4
    return SimpleNamespace(online=online, cached=cached, common=common, cfg=run.cfg)


def test_online_topk_distillation_learns_from_the_teacher(offline):
    m = _metrics(offline.online)
    assert {"train/loss", "train/kd", "train/top1"} <= set(m[8])
    assert 0.0 <= m[8]["train/top1"] <= 1.0
    assert np.mean([m[s]["train/kd"] for s in (6, 7, 8)]) < 0.7 * np.mean([m[s]["train/kd"] for s in (1, 2, 3)])
    # Pure KD (alpha = 1): the ground-truth loss falls too, so the teacher's predictions carry the data's signal.
    assert np.mean([m[s]["train/loss"] for s in (6, 7, 8)]) < np.mean([m[s]["train/loss"] for s in (1, 2, 3)]) - 0.05


def test_online_and_offline_topk_losses_agree_across_a_resume(offline):
    manifest = json.loads((offline.cached / "distill_cache" / "manifest.json").read_text())
    assert manifest["steps"] == 8 and manifest["topk"] == 16 and len(set(manifest["hashes"])) == 8
    a, b = _metrics(offline.online), _metrics(offline.cached)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:  # steps 5..8 ran after the resume: the cache stays aligned with the data
        for key in ("train/loss", "train/kd", "train/top1"):
            assert b[s][key] == pytest.approx(a[s][key], abs=1e-5), (s, key)


def test_loss_terms_are_what_they_name(offline):
    """The objective and the logged sums, on a batch with padding rows and a loss_mask, against direct
    computations: CE as the LM loss computes it, KD over the whole vocabulary, top-1 agreement."""
    cfg = config_lib.read_workdir_config(offline.online)
    for item in ("distill.topk=0", "distill.loss=forward_kl", "distill.alpha=0.3", "distill.temperature=2.0"):
        config_lib.apply_override(cfg, item)
    t = student.trainer(cfg, offline.online)
    # The teacher is bf16, a read-only input of the step, not part of the optimized state.
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(t.extra))
    assert llama.param_count(t.extra["teacher"]) > 1.5 * llama.param_count(t.abstract.params)
    assert _restored(t) == 8  # the online run's weights
    batch = next(t.objective.batches())
    batch["segment_ids"][0, 40:] = 0
    batch["loss_mask"] = np.ones_like(batch["inputs"])
    batch["loss_mask"][1, :10] = 0
    teacher_model = llama.Transformer(t.objective.teacher.model_cfg)

    def direct(params, extra, b):
        value, aux = t.objective.loss(params, extra, b, jax.random.PRNGKey(0))
        s = t.model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
        tl = teacher_model.apply({"params": extra["teacher"]}, b["inputs"], b["positions"], b["segment_ids"])
        return value, aux, s, tl, step_lib.loss_fn(params, t.model, b, t.cfg.train.z_loss)[1]
    with jax.set_mesh(t.mesh), nn.logical_axis_rules(t.rules):
        value, aux, s, tl, lm_aux = jax.jit(direct)(t.state.params, t.extra, batch)
    mask = (batch["segment_ids"] > 0) & (batch["loss_mask"] > 0)
    n = 1000  # tokenizer pieces; the logits' padding rows are no token
    s, tl = np.asarray(s, np.float32)[..., :n], np.asarray(tl.astype(jnp.float32))[..., :n]
    assert int(aux["tokens"]) == mask.sum()
    assert float(aux["ce_sum"]) == pytest.approx(float(lm_aux["ce_sum"]), rel=1e-5)
    assert float(aux["top1_sum"]) == ((s.argmax(-1) == tl.argmax(-1)) & mask).sum()
    kd = distill.kd_full(jnp.asarray(s), jnp.asarray(tl), mask, "forward_kl", 0.5, 2.0)
    assert float(aux["kd_sum"]) == pytest.approx(float(kd.sum()), rel=1e-4)
    want = 0.3 * float(aux["kd_sum"]) + 0.7 * float(aux["ce_sum"]) + float(aux["z_sum"])  # the step divides
    assert float(value) == pytest.approx(want, rel=1e-5)


def test_cache_that_does_not_match_is_one_clear_error(offline):
    folder = offline.cached / "distill_cache"
    def changed(item):
        cfg = config_lib.from_dict(config_lib.to_dict(offline.cfg))
        config_lib.apply_override(cfg, item)
        return cfg
    reader = distill_cache.Reader(folder, offline.cfg)
    other = next(iter(pipeline.train_dataset(offline.cached / "data" / "tokens", changed("data.seed=1").data, 8)))
    with pytest.raises(KslmError, match="does not match this data/config"):
        reader.attach(other)  # other data (or a run longer than the cache): an error, not silent drift
    with pytest.raises(KslmError, match="seq_len=64, this run has 32"):
        distill_cache.Reader(folder, changed("data.seq_len=32"))
    with pytest.raises(KslmError, match="top 16, fewer than distill.topk=32"):
        distill_cache.Reader(folder, changed("distill.topk=32"))


@needs("export", "safetensors")
def test_hf_teacher_loads_the_same_weights(teacher, prepared, tmp_path):
    from kslm_jax.export import hf_io
    hf_dir = hf_io.export_hf(teacher, tmp_path / "hf")
    wd = _copy(prepared, tmp_path / "student")
    cfg = workdir_lib.config_for(wd, None, [*STUDENT, f"distill.teacher={hf_dir}", "distill.teacher_format=hf"])
    b = teacher_lib.resolve(cfg, wd)
    for item in (f"distill.teacher={teacher}", "distill.teacher_format=workdir"):
        config_lib.apply_override(cfg, item)
    a = teacher_lib.resolve(cfg, wd)
    assert b.workdir == wd / teacher_lib.IMPORT_DIR and b.model_cfg == a.model_cfg
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules(cfg.mesh.rules)
    pa, pb = (teacher_lib.load_params(x, mesh, rules)[0] for x in (a, b))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))
    mtime = (b.workdir / "source.json").stat().st_mtime_ns
    config_lib.apply_override(cfg, "distill.teacher_format=hf")
    config_lib.apply_override(cfg, f"distill.teacher={hf_dir}")
    teacher_lib.resolve(cfg, wd)  # imported once, then reused
    assert (b.workdir / "source.json").stat().st_mtime_ns == mtime


def test_different_tokenizers_are_one_clear_error(teacher, prepared, tmp_path):
    from kslm_jax.data import tokenizer as tok_lib
    tcfg = config_lib.base_config().tokenizer
    with tcfg.unlocked():
        tcfg.update(vocab_size=300, character_coverage=1.0, sample_sentences=10_000, max_sentence_length=1000)
    texts = ["대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다.", "국회는 법률을 만든다."] * 50
    other = tmp_path / "other" / "spm.model"
    tok_lib.train(texts, other, tcfg)
    teacher_tok = workdir_lib.paths(teacher)["tokenizer"]
    teacher_lib.check_tokenizer(teacher_tok, teacher_tok)
    with pytest.raises(KslmError) as e:
        teacher_lib.check_tokenizer(other, teacher_tok)
    assert str(other) in str(e.value) and str(teacher_tok) in str(e.value)
    wd = _copy(prepared, tmp_path / "student")
    shutil.copy(other, workdir_lib.paths(wd)["tokenizer"])
    with pytest.raises(KslmError, match="tokenizer .* differ"):
        _student(wd, teacher)
    with pytest.raises(KslmError, match="not a workdir of this project"):
        _student(wd, tmp_path / "other")


def test_cli_distill_cache_without_a_teacher_is_one_line(prepared, tmp_path):
    wd = _copy(prepared, tmp_path / "run")
    proc = kslm("distill-cache", "--workdir", wd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("kslm: error: kslm distill-cache needs a teacher: set "
                                                     "--config.distill.teacher=PATH")
