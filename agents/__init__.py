"""Agents: one readable file per algorithm (ppo.py, dqn.py) and algorithm-independent helpers."""
