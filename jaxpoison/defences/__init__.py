"""Defences against data poisoning: training-set filters and training-time
defences, pure functions usable inside a trial (see filtering.py, training.py)."""
