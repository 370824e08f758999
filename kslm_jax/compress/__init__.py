"""Pruning a trained workdir into a smaller one, by block influence and activation importance.
"""
