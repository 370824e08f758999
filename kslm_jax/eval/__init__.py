"""Task evaluation: `kslm eval --tasks` and evaluation on a schedule during training (README: Evaluation tasks)."""
