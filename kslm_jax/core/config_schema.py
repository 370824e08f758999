"""The configuration schema: every key with its default, the sizes derived from them, and validation.

Every recipe in `configs/` starts from `base_config()` and changes fields; adding a key that the schema
does not have is an error, so a typo in a recipe or on the command line never passes silently. Loading
recipes, command-line overrides and the rules for resuming a workdir are in config.py.
"""
from __future__ import annotations

import ml_collections

from kslm_jax.core import config_checks, config_finetune
from kslm_jax.core.errors import KslmError


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = dict(
        arch="decoder",         # decoder (Llama blocks) | encoder (the same blocks, bidirectional within each document,
                                # trained by masked LM: see mlm.*) | gru | lstm (Flax's recurrent cells)
        d_model=256,            # residual width (and the recurrent state's width)
        n_layers=4,             # transformer blocks
        n_heads=4,              # query heads
        n_kv_heads=2,           # key/value heads (GQA); must divide n_heads
        head_dim=0,             # 0: d_model // n_heads
        d_ff=0,                 # SwiGLU hidden width; 0: 8/3 * d_model rounded up to a multiple of 64
        vocab_multiple=128,     # logits width is the tokenizer vocab rounded up to this (pads never win a sample)
        rope_theta=10000.0,     # rotary position embedding base
        norm_eps=1e-5,          # RMSNorm epsilon
        tie_embeddings=False,   # the output layer reuses the input embedding
        init_std=0.02,          # std of the normal initialization of the weights
        dtype="float32",        # compute dtype: float32 | bfloat16
        param_dtype="float32",  # master weights and optimizer state dtype
        attention="auto",       # auto (splash on TPU, cudnn on GPU, xla else) | xla (reference, any device) | cudnn
                                # (flash, mask) | cudnn_packed (flash, ragged; Hopper+) | splash (Pallas, TPU)
                                # | tokamax_mosaic, tokamax_triton (tokamax's Pallas flash kernels; kernels extra)
        kernels="xla",          # xla | tokamax (fused SwiGLU and RMSNorm from tokamax) | tokamax_glu | tokamax_norm
        matmul_precision="default",  # default (compute dtype) | fp8 (e4m3 operands, e5m2 gradients; Hopper;
                                # the blocks' projections only: lm_head keeps the compute dtype; each scale
                                # from this step's tensor) | fp8_delayed (the same, each scale from the amax
                                # history of earlier steps, Flax's fp8_ops; pretraining of the decoder only)
        fp8_amax_history=1024,  # fp8_delayed: steps of amax each scale is taken from (Flax/TransformerEngine's)
        scan_layers=True,       # one compiled layer body scanned over depth: fast compiles at any depth
        scan_unroll=1,          # layers per iteration of that scan: unrolled speed, compile time bounded by this
        remat="none",           # none | dots | full: what the backward pass recomputes instead of storing
    )
    c.tokenizer = dict(
        vocab_size=8000,        # tokenizer pieces; the logits pad this to a multiple of model.vocab_multiple
        model_type="bpe",               # bpe | unigram
        pretokenize="none",             # none | kiwi: pieces never cross a morpheme boundary (needs kiwipiepy)
        character_coverage=0.9995,      # rarer characters fall back to UTF-8 bytes
        byte_fallback=True,     # characters outside the vocabulary become UTF-8 byte pieces, never <unk>
        split_digits=True,      # each digit its own piece
        sample_sentences=2_000_000,     # sentences SentencePiece samples for training
        max_sentence_length=8192,       # longer lines are cut into pieces for tokenizer training only
        special_tokens="",              # chat-template markers made single pieces, e.g. "<|user|>,<|assistant|>,<|end|>"
    )
    c.data = dict(
        sources="",             # comma-separated files or globs (README: Input formats); "demo" = bundled corpus
        text_mode="paragraph",  # txt files: file | paragraph (blank-line blocks) | line
        text_field="text",      # jsonl/json: key holding the text (a.b nested); csv/tsv/parquet: the column
        val_fraction=0.05,      # share of documents held out, chosen by a hash of the text
        split_field="",         # jsonl/json/csv: hash this field (e.g. movie_id) instead of the text to pick the split
        min_chars=10,           # documents shorter than this (after cleaning) are dropped
        max_chars=1_000_000,    # documents longer than this (after cleaning) are dropped; 0: no limit
        min_hangul_ratio=0.3,   # Hangul syllables and jamo over non-space characters
        max_symbol_ratio=0.5,   # punctuation and symbols over non-space characters
        max_dup_line_ratio=0.3,  # characters in lines that repeat an earlier line of the document, over all
        max_top_2gram_ratio=0.2,   # repeats of the most frequent eojeol 2-gram, in characters over all (Gopher-like)
        max_top_3gram_ratio=0.18,  # the same for 3-grams
        max_top_4gram_ratio=0.16,  # the same for 4-grams
        max_repeat=3,           # runs of one non-digit character are cut to this many (ㅋㅋㅋㅋㅋ → ㅋㅋㅋ); 0: off
        email_action="replace",  # e-mail addresses: replace (by <이메일>) | drop (the document) | keep
        url_action="replace",   # URLs: replace (<URL>) | drop | keep
        rrn_action="replace",   # resident registration numbers 900101-1234567: replace (<주민번호>) | drop | keep
        card_action="replace",  # card numbers, 4 groups of 4 digits: replace (<카드번호>) | drop | keep
        phone_action="replace",  # Korean phone numbers (010-, 02-, +82 …): replace (<전화번호>) | drop | keep
        dedup=dict(
            exact=True,         # drop documents whose normalized text (lower case, letters, digits) came before
            near=True,          # drop near-duplicates of earlier kept documents (MinHash LSH)
            ngram=5,            # character n-gram (shingle) size, on the normalized text
            bands=14,           # LSH bands; bands * rows MinHash permutations
            rows=9,             # rows per band; Jaccard threshold ≈ (1/bands)^(1/rows) = 0.75
            seed=0,             # MinHash permutations
        ),
        prepare_workers=0,      # processes that clean and hash in `kslm prepare` (0: one per CPU core)
        shard_docs=100_000,     # documents per clean/token shard
        seq_len=256,            # tokens per training row (documents are packed into rows)
        seed=0,                 # shuffling of the training stream and the tokenizer's sample
        packing_bins=8,         # rows the first-fit packer keeps open
        max_segments_per_row=64,  # documents one packed row may hold (cudnn_packed sizes its tables by it)
        workers=0,              # batches each stream prepares ahead in a background thread (0: on demand)
        worker_processes=0,     # grain mp_prefetch processes packing groups; pays on spare cores only (keep to resume)
        tokenize_workers=0,     # processes that encode token shards in `kslm tokenize` (0: one per CPU core)
        cache_mb=2048,          # a split whose tokens fit in this many MiB is read into memory once (0: never)
        mixture="",             # weighted sources, "pattern:weight,..." (fnmatch on each document's source); "": as read
        verify_shards=True,     # CRC32 of every token shard at start (sizes and record counts are always checked)
        streams=1,              # independent data streams; a multi-host run needs a multiple of its host count
    )
    c.optim = dict(
        lr=3e-3,                # peak learning rate (AdamW)
        min_lr_ratio=0.1,       # cosine decays to lr * min_lr_ratio
        warmup_steps=20,        # linear warmup from 0 to lr
        b1=0.9,                 # AdamW first-moment decay
        b2=0.95,                # AdamW second-moment decay
        eps=1e-8,               # AdamW denominator epsilon
        weight_decay=0.1,       # applied to matrices only
        grad_clip=1.0,          # global-norm clipping; 0 disables
    )
    c.train = dict(
        steps=200,              # optimizer steps of the whole run (a resumed run continues to this)
        step_timeout_s=0.0,     # >0: a step that takes longer (after the first) ends the run with exit code 3
        batch_size=16,          # global sequences per optimizer step
        grad_accum=1,           # micro-batches per step (batch_size must divide by it)
        seed=0,                 # weight initialization
        z_loss=1e-4,            # weight of log(Z)^2, keeps logits from drifting
        loss_chunk=0,           # >0: logits and loss in sequence chunks of this many tokens (never all fp32 logits)
        loss_impl="dense",      # dense (logits, then the loss) | cce (jax-cce fused linear + CE over vocabulary
                                # chunks: never the B*T*V logits; needs z_loss=0; kernels extra)
        nonfinite="skip",       # a NaN/Inf step is never applied; then: skip (count it) | restore | raise
        spike_zscore=6.0,       # a loss this many running std above its running mean is a spike (0: off)
        max_skipped_steps=5,    # this many non-finite steps in a row stop the run, last good state saved (0: never)
        debug_nans=False,       # the first non-finite step is re-run op by op under jax_debug_nans to name the
                                # operation and Flax module that made it; the run then stops, last good state saved
        log_every=10,           # steps between logged training metrics
        eval_every=0,           # 0: evaluate only at the end
        eval_batches=0,         # 0: the whole validation split
    )
    c.mesh = dict(
        data=-1,                # -1: all devices left after the other axes
        fsdp=1,                 # devices the parameters and optimizer state are sharded over
        tensor=1,               # devices each matrix is split over (tensor parallelism)
        slices=1,               # multi-slice TPU: slices joined over DCN; mesh.data spans them
        rules="fsdp_tp",        # parameter sharding preset: dp | fsdp | fsdp_tp (see sharding.PRESETS)
    )
    c.checkpoint = dict(
        every_steps=100,        # steps between checkpoints (the last step always saves)
        keep=3,                 # newest checkpoints kept (orbax LatestN)
        keep_every=0,           # >0: also keep every step that is a multiple of this (orbax EveryNSteps)
        async_save=True,        # write checkpoints in the background while training goes on
    )
    c.logging = dict(
        tensorboard=True,       # write WORKDIR/tensorboard event files
        progress_bar=True,      # the training progress bar (shown on a terminal only)
        peak_tflops=0.0,        # per-device peak for MFU; 0: look the device up in metrics.PEAK_TFLOPS
        profile_steps="",       # "START:STOP": a jax.profiler trace of steps START..STOP (both included) into
                                # WORKDIR/tensorboard, TensorBoard's Profile tab; "": none (kslm train --profile)
        profile_all_hosts=False,  # trace on every process, not only process 0
    )
    c.generate = dict(
        max_new_tokens=64,      # tokens sampled after the prompt (kslm generate --max-new-tokens)
        temperature=0.8,        # 0: greedy; higher: more varied (--temperature)
        top_k=50,               # sample among the k most likely tokens (0: all)
        top_p=0.95,             # sample among the smallest set holding this probability mass (--top-p)
        seed=0,                 # sampling seed (--seed)
    )
    c.distill = dict(
        teacher="",             # teacher: a workdir of this project or a local HF Llama folder; "" = no distillation
        teacher_format="workdir",  # workdir | hf (imported once into WORKDIR/teacher_import)
        loss="forward_kl",      # forward_kl KL(t||s) | reverse_kl KL(s||t) | jsd (generalized, beta) | skew_kl
        beta=0.5,               # jsd: teacher weight in the mixture m = beta*t + (1-beta)*s; skew_kl: KL(t || m)
        temperature=1.0,        # both distributions softened by it; the KD term is scaled by temperature**2
        alpha=0.5,              # loss = alpha * KD + (1 - alpha) * ground-truth CE (+ z-loss)
        topk=0,                 # >0: KD over the teacher's top-k tokens, both sides renormalized over them
        cache="",               # `kslm distill-cache` output (relative: inside the workdir); read instead of the teacher
    )
    c.finetune = dict(
        kind="none",            # none (pretraining on data.sources) | sft (prompt/response) | cls (sequence classification)
                                # | dpo (preference pairs prompt/chosen/rejected against a frozen reference)
        init_from="",           # workdir of a trained model: its newest weights start the run; its model shape and
                                # tokenizer keys replace this config's
        train_files="",         # comma-separated example files: jsonl, json, csv, tsv (each may be .gz)
        val_files="",           # held-out examples; "": val_fraction of train_files, chosen by a hash of split_field
        val_fraction=0.1,       # share of train_files held out when val_files is ""
        split_field="",         # hash this field (e.g. movie_id) to choose the held-out split; "": the whole record
        prompt_field="prompt",  # sft, dpo: the user turn
        response_field="response",  # sft: the answer; the loss is on its tokens (and the end marker) only
        template="<|user|>{prompt}<|end|><|assistant|>{response}<|end|>",  # sft, dpo: <|name|> are tokenizer.special_tokens
        chosen_field="chosen",  # dpo: the preferred response; an empty one is refused with its file and line
        rejected_field="rejected",  # dpo: the dispreferred response to the same prompt
        dpo_loss="dpo",         # dpo: dpo (-log sigmoid(beta * margin)) | ipo ((margin - 1/(2 beta))**2, Azar et al.)
        dpo_beta=0.1,           # dpo: strength of the pull toward the reference; rewards are beta * log-prob ratios
        text_field="text",      # cls: the text to classify
        label_field="label",    # cls: a class name, a class index, or a number that label_bins maps to a name
        labels="",              # cls: class names in index order, e.g. "negative,positive"
        label_bins="",          # cls: numeric label ranges to names, "1-4:negative,9-10:positive"; other values dropped
        cls_template="{text}",  # cls: the text as the model reads it, e.g. "{text} 감정:" for label_words
        head="linear",          # cls: linear (a head on the pooled final states) | label_words (LM scores)
        pool="auto",            # cls linear head reads: auto (first for an encoder, last for a decoder) | first (the
                                # example's first token, its BOS) | last (its last token) | mean (all its tokens)
        label_words="",         # cls head=label_words: one word per class in label order; their first pieces are scored
        too_long="drop",        # examples over data.seq_len tokens: drop | truncate (sft: the response's end; cls: the text's;
                                # dpo: each response cut to half the row)
        eval_examples=0,        # held-out examples scored at each evaluation (0: all)
        eval_generate=32,       # sft: held-out prompts answered greedily for ROUGE-L and BLEU at each evaluation (0: off)
        max_new_tokens=48,      # sft: length cap of those answers
    )
    c.mlm = dict(
        rate=0.15,              # model.arch=encoder: share of real tokens (BOS/EOS never) chosen for prediction
        mask=0.8,               # of the chosen, the share replaced by mlm.token
        random=0.1,             # of the chosen, the share replaced by a random piece (the rest stay unchanged)
        whole_eojeol=False,     # choose whole eojeols (whitespace-delimited words: a '▁' piece opens one)
        token="<|mask|>",       # the mask piece: must be one of tokenizer.special_tokens
    )
    c.lora = dict(
        rank=0,                 # >0: train low-rank adapters only (finetune.kind sft, cls or dpo); the base stays frozen
        alpha=16.0,             # adapter output scaled by alpha / rank
        dropout=0.0,            # dropout on the adapters' input during training
        targets="q,k,v,o",      # projections that get adapters: q, k, v, o (attention), gate, up, down (MLP)
        base_dtype="float32",   # the frozen base in device memory: float32 | bfloat16 | int8 (per output channel)
    )
    c.eval = dict(
        tasks="",               # benchmark tasks "kind=path,..." (README: Evaluation tasks); kslm eval --tasks, and
                                # during training every train.eval_every steps
        fewshot="",             # "kind=path,...": the split few-shot examples are drawn from
        shots=0,                # few-shot examples put before each question
        limit=0,                # records evaluated per task (0: all)
        batch_size=16,          # rows per scoring batch
    )
    c.lock()
    return c


def padded_vocab(cfg) -> int:
    m = cfg.model.vocab_multiple
    return -(-cfg.tokenizer.vocab_size // m) * m


def head_dim(cfg) -> int:
    return cfg.model.head_dim or cfg.model.d_model // cfg.model.n_heads


def d_ff(cfg) -> int:
    return cfg.model.d_ff or -(-(8 * cfg.model.d_model // 3) // 64) * 64


_CHOICES = {
    "model.arch": ("decoder", "encoder", "gru", "lstm"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "xla", "cudnn", "cudnn_packed", "splash", "tokamax_mosaic", "tokamax_triton"),
    "model.kernels": ("xla", "tokamax", "tokamax_glu", "tokamax_norm"),
    "model.matmul_precision": ("default", "fp8", "fp8_delayed"),
    "train.loss_impl": ("dense", "cce"),
    "model.remat": ("none", "dots", "full"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "tokenizer.pretokenize": ("none", "kiwi", "jamo"),
    "data.text_mode": ("file", "paragraph", "line"),
    "data.email_action": ("replace", "drop", "keep"),
    "data.url_action": ("replace", "drop", "keep"),
    "data.rrn_action": ("replace", "drop", "keep"),
    "data.card_action": ("replace", "drop", "keep"),
    "data.phone_action": ("replace", "drop", "keep"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp"),
    "train.nonfinite": ("skip", "restore", "raise"),
    "distill.teacher_format": ("workdir", "hf"),
    "distill.loss": ("forward_kl", "reverse_kl", "jsd", "skew_kl"),
    "finetune.kind": ("none", "sft", "cls", "dpo"),
    "finetune.dpo_loss": ("dpo", "ipo"),
    "finetune.head": ("linear", "label_words"),
    "finetune.pool": ("auto", "first", "last", "mean"),
    "finetune.too_long": ("drop", "truncate"),
    "lora.base_dtype": ("float32", "bfloat16", "int8"),
}


def validate(cfg) -> None:
    """Check types against the schema and values against each other."""
    _check_types(cfg, base_config(), "")
    for key, allowed in _CHOICES.items():
        v = _get(cfg, key)
        if v not in allowed:
            raise KslmError(f"config key {key}={v!r} is not one of {', '.join(allowed)}")
    for key in ("model.n_heads", "model.n_kv_heads", "train.grad_accum"):  # divisors below
        if _get(cfg, key) < 1:
            raise KslmError(f"config key {key}={_get(cfg, key)} must be positive")
    m = cfg.model
    if m.n_heads % m.n_kv_heads:
        raise KslmError(f"config key model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise KslmError(f"config key model.d_model={m.d_model} must divide by model.n_heads={m.n_heads} "
                        "(or set model.head_dim)")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise KslmError(f"config key train.batch_size={cfg.train.batch_size} must divide by "
                        f"train.grad_accum={cfg.train.grad_accum}")
    for key in ("model.d_model", "model.n_layers", "tokenizer.vocab_size", "data.seq_len", "train.batch_size",
                "train.grad_accum", "data.packing_bins"):
        if _get(cfg, key) < 1:
            raise KslmError(f"config key {key}={_get(cfg, key)} must be positive")
    if cfg.train.max_skipped_steps < 0:
        raise KslmError(f"config key train.max_skipped_steps={cfg.train.max_skipped_steps} must be 0 or more")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise KslmError(f"config key data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    config_checks.check_ranges(cfg)
    config_checks.profile_steps(cfg.logging.profile_steps)
    config_checks.check_kernels(cfg)
    config_checks.check_arch(cfg)
    config_checks.validate_distill(cfg)
    config_finetune.validate(cfg)
    config_checks.validate_cleaning(cfg.data)


def _check_types(cfg, ref, prefix):
    """What ConfigDict's own typing lets through. It refuses a str or float set on an int key (and every cast
    it cannot make) at assignment, and config.py turns that TypeError into one line; it accepts None, a bool
    on a numeric key and a section replaced whole, which this walk refuses."""
    for k, rv in ref.items():
        v = cfg[k]
        key = f"{prefix}{k}"
        if isinstance(rv, ml_collections.ConfigDict):
            _check_types(v, rv, key + ".")
        elif not _same_type(v, rv):
            raise KslmError(f"config key {key}={v!r} has type {type(v).__name__}, expected {type(rv).__name__}")


def _same_type(v, rv) -> bool:
    if isinstance(rv, bool) or isinstance(v, bool):
        return isinstance(v, bool) and isinstance(rv, bool)
    if isinstance(rv, float):
        return isinstance(v, (int, float))
    return isinstance(v, type(rv))


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node
