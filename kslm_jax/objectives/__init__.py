"""What is trained: each objective is a loss, frozen inputs, batches and evaluation handed to train's loop
(pretraining, SFT, classification, LoRA, distillation), plus the plain decoder of any workdir.
"""
