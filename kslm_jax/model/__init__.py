"""The decoder as a pure function of (params, tokens, positions, segment ids), its attention kernels, LoRA,
weight quantization, the HF name table and classification heads. Imports data (token ids) and core.
"""
