"""Metrics and the task harness: held-out LM metrics, scoring of example sets, text metrics and KV-cache
generation (README: Evaluation tasks). It is handed a model and weights and never loads a workdir, which is why
the training loop (one layer up) can use it.
"""
