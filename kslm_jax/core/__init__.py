"""The bottom layer: config schema and loading, errors, the workdir, sharding, distributed start-up,
checkpoints and metrics. It imports nothing else of kslm_jax, so every other layer can rely on it.
"""
