"""Poisoning attacks as pure functions of arrays and keys."""
