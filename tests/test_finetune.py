"""Fine-tuning on real Korean data with a tiny model: chat special tokens, SFT loss masking and whole-example
packing, classification split by movie, LoRA (only adapters train; merged = base + adapters), and task
evaluation through `kslm eval --tasks` and on the training schedule."""
import csv
import gzip
import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kslm_jax.cli import commands
from kslm_jax.core import config as config_lib
from kslm_jax.core import workdir as workdir_lib
from kslm_jax.core.errors import KslmError
from kslm_jax.data import examples, finetune_data, prepare
from kslm_jax.data import tokenizer as tok_lib
from kslm_jax.model import classify, llama, lora
from kslm_jax.objectives import finetune, finetune_io

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko"
SPECIAL = "<|user|>,<|assistant|>,<|end|>"
BASE = ["tokenizer.vocab_size=1000", "tokenizer.character_coverage=0.98", f"tokenizer.special_tokens={SPECIAL}",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64",
        "train.batch_size=8", "eval.batch_size=8", "mesh.data=1", "logging.progress_bar=false", "train.log_every=1",
        "optim.warmup_steps=2", "checkpoint.every_steps=1000"]


@jax.jit
def _logits(params, batch):
    """Plain decoder logits of a packed batch; one compile serves every test (same model, same shapes)."""
    return _MODEL.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])


_MODEL = None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Small real files (chatbot QA pairs, NSMC reviews of a few movies) and a random-init base workdir whose
    tokenizer has the chat markers."""
    root = tmp_path_factory.mktemp("ft")
    with open(DATA / "chatbot_qa.csv", encoding="utf-8") as f:
        qa = list(itertools.islice(csv.DictReader(f), 700))
    with open(root / "qa.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["Q", "A", "label"])
        w.writeheader()
        w.writerows(qa)
    with gzip.open(DATA / "nsmc_reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        reviews = [json.loads(line) for line in itertools.islice(f, 2500)]
    (root / "nsmc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reviews),
                                     encoding="utf-8")
    cfg = config_lib.load(None, BASE)
    base = root / "base"
    texts = [r["Q"] for r in qa] + [r["A"] for r in qa] + [r["text"] for r in reviews]
    sp = tok_lib.train(texts, base / "tokenizer" / "spm.model", cfg.tokenizer)
    global _MODEL
    model = _MODEL = llama.Transformer(llama.ModelConfig.from_config(cfg))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.normal(0, 0.05, s.shape)).astype(np.float32),
                          jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                                       is_leaf=lambda x: hasattr(x, "unbox")))
    finetune_io.save_plain(cfg, params, base)
    return SimpleNamespace(root=root, base=base, sp=sp, qa=qa, reviews=reviews, params=params)


def _cfg(env, *overrides):
    return config_lib.load(None, BASE + [f"finetune.init_from={env.base}", *overrides])


SFT = ["finetune.kind=sft", "finetune.prompt_field=Q", "finetune.response_field=A", "finetune.eval_generate=4",
       "finetune.max_new_tokens=8", "finetune.eval_examples=32"]


def _sft(env, *extra):
    return _cfg(env, *SFT, f"finetune.train_files={env.root / 'qa.csv'}", *extra)


def _cls(env, *extra):
    return _cfg(env, "finetune.kind=cls", f"finetune.train_files={env.root / 'nsmc.jsonl'}",
                "finetune.label_field=rating", "finetune.labels=negative,positive",
                "finetune.label_bins=1-4:negative,9-10:positive", "finetune.split_field=movie_id",
                "finetune.val_fraction=0.3", "finetune.too_long=truncate", *extra)


# ------------------------------------------------------------------------------------------- data, no model

def test_special_tokens_are_single_pieces_and_roundtrip(env):
    sp = env.sp
    text = "<|user|>오늘 너무 피곤해<|end|><|assistant|>푹 쉬세요.<|end|>"
    ids = sp.EncodeAsIds(text)
    assert sp.DecodeIds(ids) == text
    marks = tok_lib.special_ids(sp, ["<|user|>", "<|assistant|>", "<|end|>"], "test")
    assert [i for i in ids if i in marks.values()] == [marks["<|user|>"], marks["<|end|>"],
                                                       marks["<|assistant|>"], marks["<|end|>"]]
    with pytest.raises(KslmError, match=r"config key finetune.template uses the special token <\|system\|>, "
                                        r"which the tokenizer does not have"):
        finetune_data.build(_sft(env, "finetune.template=<|system|>{prompt}<|assistant|>{response}<|end|>"), sp)
    with pytest.raises(KslmError, match="config key tokenizer.special_tokens: '<user>' is not of the form"):
        config_lib.load(None, ["tokenizer.special_tokens=<user>"])


def test_sft_loss_is_on_the_answer_and_packing_keeps_examples_whole(env):
    sp = env.sp
    data = finetune_data.build(_sft(env), sp)
    train = data.train.examples
    end = sp.PieceToId("<|end|>")
    by_prompt = {r["Q"]: r["A"] for r in env.qa}
    for i in range(20):
        ids, flags = train.seq(i), train.flag(i)
        assert ids[0] == tok_lib.BOS and ids[-1] == end
        answer = [t for t, f in zip(ids, flags) if f]  # the loss covers the answer and the end marker only
        assert answer[-1] == end and sp.DecodeIds(answer[:-1]) == data.train.references[i]
        prompt = sp.DecodeIds(list(ids[1:list(flags).index(1)]))
        assert prompt.startswith("<|user|>") and prompt.endswith("<|end|><|assistant|>")
        question = prompt[len("<|user|>"):-len("<|end|><|assistant|>")].strip()
        assert by_prompt[question] == data.train.references[i]
    stream = examples.ExampleStream(train, 8, 64, 64, seed=3)
    batches = [next(stream) for _ in range(3)]
    seen = []
    for b in batches:
        for r in range(8):
            for s in range(1, b["segment_ids"][r].max() + 1):
                at = b["segment_ids"][r] == s
                whole = np.concatenate([b["inputs"][r][at], b["targets"][r][at][-1:]])
                e = next(e for e in range(len(train)) if np.array_equal(train.seq(e), whole))
                assert np.array_equal(b["loss_mask"][r][at], train.flag(e)[1:])
                assert np.array_equal(b["positions"][r][at], np.arange(at.sum()))
                seen.append(e)
    assert len(seen) == len(set(seen)) > 24  # whole examples, several per row, none twice in an epoch
    again = examples.ExampleStream(train, 8, 64, 64, seed=3)
    again.set_state(json.loads(json.dumps(stream.get_state())))  # as the checkpoint stores it
    resumed, straight = next(again), next(stream)
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)


def test_too_long_examples_are_dropped_or_truncated_and_counted(env):
    dropped = finetune_data.build(_sft(env, "data.seq_len=12"), env.sp)
    cut = finetune_data.build(_sft(env, "data.seq_len=12", "finetune.too_long=truncate"), env.sp)
    n_drop = dropped.train.counts["too_long_dropped"]
    assert n_drop > 50 and dropped.train.counts["examples"] + n_drop == dropped.train.counts["records"]
    assert cut.train.counts["truncated"] > 0 and max(cut.train.examples.lengths) == 12
    assert cut.train.counts["examples"] > dropped.train.counts["examples"]


def test_classification_labels_by_rating_and_split_by_movie(env):
    data = finetune_data.build(_cls(env), env.sp)
    rep = data.report()
    by_movie = {}
    for r in env.reviews:
        by_movie.setdefault(r["movie_id"], set()).add(prepare.split_of(r["movie_id"], 0.3))
    assert all(len(v) == 1 for v in by_movie.values())
    assert set(data.train.groups).isdisjoint(data.val.groups) and data.val.groups
    outside = sum(1 for r in env.reviews if 4 < r["rating"] < 9)
    assert rep["train"]["outside_label_bins"] + rep["val"]["outside_label_bins"] == outside
    pos = sum(1 for r in env.reviews if r["rating"] >= 9)
    assert rep["train"]["per_class"]["positive"] + rep["val"]["per_class"]["positive"] == pos
    assert data.train.examples.layout == "cls" and set(np.unique(data.train.examples.labels)) == {0, 1}


def test_lora_targets_must_match_modules(env):
    with pytest.raises(KslmError, match="config key lora.targets: 'attn' matches no module"):
        _sft(env, "lora.rank=4", "lora.targets=q,attn")
    tree = {"layers": {"self_attn": {"q_proj": {"kernel": np.zeros((2, 4, 2, 2))}}}}
    with pytest.raises(KslmError, match="config key lora.targets: 'up_proj' matches no module"):
        lora.module_paths(tree, ["q_proj", "up_proj"])


# ----------------------------------------------------------------------------------------- training, models

def _run(env, name, cfg):
    wd = env.root / name
    workdir_lib.bind(wd, cfg, force=True)
    trainer = finetune.trainer(cfg, wd)
    return wd, trainer, trainer.fit()


def test_sft_full_trains_and_evaluates_tasks_on_its_schedule(env):
    tasks = f"kornli={DATA / 'kornli_xnli_dev.tsv'},korsts={DATA / 'korsts_dev.tsv'}"
    cfg = _sft(env, "train.steps=12", "train.eval_every=6", "optim.lr=3e-2", f"eval.tasks={tasks}",
               "eval.limit=12", "eval.batch_size=8")
    wd, trainer, summary = _run(env, "sft", cfg)
    losses = summary["losses"]
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)]) - 0.3
    ev = summary["eval"]
    assert 0 < ev["loss"] < 10 and ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))
    assert 0 <= ev["rouge_l"] <= 100 and 0 <= ev["bleu"] <= 100
    assert 0 <= ev["kornli/accuracy"] <= 1 and -1 <= ev["korsts/spearman"] <= 1
    assert json.loads((wd / "eval" / "kornli.json").read_text())["step"] == 12
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/kornli/accuracy" in r] == [6, 12]
    # the held-out answer loss is the masked token loss computed directly on the same examples
    val = trainer.objective.data.val.examples.subset(trainer.objective.eval_indices())
    sums, counts = trainer.objective.scorer.example_logprobs(trainer.lm_params(), val)
    assert ev["loss"] == pytest.approx(-sums.sum() / counts.sum(), rel=1e-5)
    assert counts.sum() == sum(int(val.flag(i)[1:].sum()) for i in range(len(val)))


def test_lora_trains_only_adapters_and_merges_exactly(env):
    cfg = _sft(env, "lora.rank=4", "lora.alpha=8", "lora.targets=q,v,down", "lora.dropout=0.1",
               "train.steps=4", "optim.lr=1e-2", "finetune.eval_generate=0")
    wd, trainer, _ = _run(env, "lora", cfg)
    params = trainer.state.params
    assert set(params) == {"adapters"}
    assert {tuple(str(k.key) for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]} == {
        ("adapters", "layers", "self_attn", "q_proj"), ("adapters", "layers", "self_attn", "v_proj"),
        ("adapters", "layers", "mlp", "down_proj")}
    n_adapters = lora.count(params)
    # per layer, rank 4: q (32 in, 2 heads x 16 out), v (32 in, 1 kv head x 16 out), down (d_ff 128 in, 32 out)
    assert n_adapters == 2 * (4 * (32 + 32) + 4 * (32 + 16) + 4 * (128 + 32))
    # the optimizer holds two moments of the adapters and nothing of the base
    assert sum(x.size for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim) == 2 * n_adapters
    lora_b = [v for k, v in jax.tree_util.tree_flatten_with_path(params)[0] if "lora_b" in jax.tree_util.keystr(k)]
    assert len(lora_b) == 3 and all(np.abs(np.asarray(b)).max() > 0 for b in lora_b)  # B starts at 0, trained
    for got, want in zip(jax.tree.leaves(trainer.extra["base"]), jax.tree.leaves(env.params)):
        np.testing.assert_array_equal(np.asarray(got), want)  # the frozen base did not move
    batch = next(iter(examples.one_pass(trainer.objective.data.val.examples, 8, 64, 64)))[0]
    with jax.set_mesh(trainer.mesh):
        adapted = jax.jit(lambda p, e, b: trainer.objective.forward(p, e, b))(params, trainer.extra, batch)
        merged = _logits(trainer.lm_params(), batch)
    mask = batch["segment_ids"] > 0
    np.testing.assert_allclose(np.asarray(merged)[mask], np.asarray(adapted)[mask], atol=2e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(_logits(env.params, batch)))[mask].max() > 1e-3
    # kslm merge-lora: a plain workdir holding exactly the merged decoder
    out = env.root / "lora_merged"
    commands.merge_lora(SimpleNamespace(workdir=str(wd), out=str(out), config=None, force=False), [])
    plain = finetune_io.restore_params_host(config_lib.read_workdir_config(out), out)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(jax.tree.map(np.asarray, trainer.lm_params()))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lora_dropout_run_resumes_bit_exact(env):
    """Adapter dropout draws its masks from (seed, step, micro-batch), kept in the checkpointed state: a run
    stopped by SIGTERM after step 4 and resumed draws the masks of the uninterrupted run, so its losses and
    adapters are bit-identical."""
    cfg = _sft(env, "lora.rank=4", "lora.targets=q,v", "lora.dropout=0.3", "train.steps=6", "train.grad_accum=2",
               "checkpoint.every_steps=3", "optim.lr=1e-2", "finetune.eval_generate=0", "finetune.eval_examples=8")
    wd, straight, _ = _run(env, "lora_straight", cfg)
    resumed_wd = env.root / "lora_resumed"
    workdir_lib.bind(resumed_wd, cfg, force=True)
    resumed = finetune.trainer(cfg, resumed_wd)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KSLM_FAULT_SIGTERM_AT_STEP", "4")
        assert resumed.fit()["stopped_by"] == "SIGTERM"
    resumed.state = None  # state (its rng included) and data position come back from the step-4 checkpoint
    resumed.fit()
    assert resumed.start_step == 4

    def losses(w):
        return {r["step"]: r["train/loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in r}
    assert losses(resumed_wd) == losses(wd) and sorted(losses(wd)) == list(range(1, 7))
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_base_matches_its_dequantized_weights(env):
    host = finetune_io.base_for_lora(env.params, "int8")
    q = host["layers"]["mlp"]["up_proj"]
    assert q["kernel_int8"].dtype == np.int8 and q["kernel_scale"].shape == (2, 128)
    deq = lora.dequantize(host)
    err = np.abs(np.asarray(deq["layers"]["mlp"]["up_proj"]["kernel"]) - env.params["layers"]["mlp"]["up_proj"]["kernel"])
    assert 0 < err.max() <= np.abs(env.params["layers"]["mlp"]["up_proj"]["kernel"]).max() / 127 / 2 + 1e-7
    ids = [tok_lib.BOS, *env.sp.EncodeAsIds("오늘 날씨가 좋네요 정말로")]
    batch = examples.fill(examples.ExampleSet([ids], [[1] * len(ids)]), [[0]], 8, 64, 64)

    @jax.jit
    def via_int8(p, b):
        with lora.intercept(1.0):
            return _logits.__wrapped__(p, b)
    np.testing.assert_allclose(via_int8(host, batch), _logits(deq, batch), atol=1e-5)


def test_classifier_head_trains_and_reports_accuracy_and_f1(env):
    cfg = _cls(env, "train.steps=10", "optim.lr=3e-3")
    wd, trainer, summary = _run(env, "cls", cfg)
    assert set(trainer.state.params) == {"model", "head"}
    ev = summary["eval"]
    assert ev["examples"] == len(trainer.objective.data.val.examples) and 0 <= ev["macro_f1"] <= ev["accuracy"] <= 1
    assert summary["losses"][10] < summary["losses"][1]
    # label-word scoring reads the LM head: the class scores are the logits of the words' first pieces
    ids = classify.label_word_ids(env.sp, "별로,최고", 2)
    batch, plan = next(iter(examples.one_pass(trainer.objective.data.val.examples, 8, 64, 64)))
    scores = classify.predict(trainer.model, env.params, None, jnp.asarray(ids), batch)
    logits = _logits(env.params, batch)
    r, s = 0, len(plan[0]) - 1
    np.testing.assert_allclose(scores[r, s], logits[r, batch["cls_index"][r, s]][ids], rtol=1e-4, atol=1e-5)
    with pytest.raises(KslmError, match="share a first piece"):
        classify.label_word_ids(env.sp, "최고,최고", 2)


def test_kslm_eval_tasks_on_files_writes_json_and_matches_direct_scoring(env, tmp_path):
    copa = tmp_path / "copa.jsonl"
    copa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"premise": "비가 많이 왔다.", "question": "결과", "alternative_1": "길이 젖었다.", "alternative_2": "해가 떴다.",
         "label": 0},
        {"premise": "배가 고팠다.", "question": "결과", "alternative_1": "밥을 먹었다.", "alternative_2": "잠을 잤다.",
         "label": 0}]), encoding="utf-8")
    doc = tmp_path / "doc.txt"
    doc.write_text("대한민국의 주권은 국민에게 있다.\n\n모든 권력은 국민으로부터 나온다.\n", encoding="utf-8")
    args = SimpleNamespace(workdir=str(env.base), config=None, force=False, tasks=f"kobest_copa={copa},ppl={doc}",
                           fewshot=f"kobest_copa={copa}", shots=1, limit=0)
    assert commands.eval_(args, []) == 0
    res = json.loads((env.base / "eval" / "kobest_copa.json").read_text())
    assert res["n"] == 2 and res["shots"] == 1 and res["accuracy"] in (0.0, 0.5, 1.0)
    ppl = json.loads((env.base / "eval" / "ppl.json").read_text())
    # perplexity by hand: each document [BOS] text [EOS], every token after BOS predicted once
    docs = [[tok_lib.BOS, *env.sp.EncodeAsIds(t), tok_lib.EOS]
            for t in ("대한민국의 주권은 국민에게 있다.", "모든 권력은 국민으로부터 나온다.")]
    batch = examples.fill(examples.ExampleSet(docs, [[1] * len(d) for d in docs]), [[0], [1]], 8, 64, 64)
    logp = np.asarray(jax.nn.log_softmax(_logits(env.params, batch), -1))
    nll = -sum(float(logp[r, i, t]) for r, d in enumerate(docs) for i, t in enumerate(d[1:]))
    n = sum(len(d) - 1 for d in docs)
    assert ppl["tokens"] == n and ppl["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert ppl["bits_per_char"] == pytest.approx(nll / np.log(2) / (len("대한민국의 주권은 국민에게 있다.")
                                                                   + len("모든 권력은 국민으로부터 나온다.") + 2), rel=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 3}) + "\n", encoding="utf-8")
    with pytest.raises(KslmError, match=f"task mc: {bad} line 1: answer answer=3 is out of range 0..0"):
        commands.eval_(SimpleNamespace(**{**vars(args), "tasks": f"mc={bad}", "fewshot": None, "shots": 0}), [])
