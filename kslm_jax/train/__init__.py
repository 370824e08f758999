"""State, optimizer, the pure jitted step and the one loop that runs any objective; HF import, because
what it writes is a train state. Imports eval for evaluation during training, never objectives.
"""
