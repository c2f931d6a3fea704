"""remesh: RLHF training with execution plans, parameter reallocation and adaptive speculative rollouts."""

__version__ = "0.1.0"
