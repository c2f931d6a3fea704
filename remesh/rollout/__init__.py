"""Generation for RL: sampling distributions, the rollout engine, drafters and speculative verification."""

from remesh.rollout.engine import GenerationStats, Rollout, RolloutEngine, generate, greedy
from remesh.rollout.sampling import SamplingParams, sample, target_logprobs

__all__ = ["GenerationStats", "Rollout", "RolloutEngine", "SamplingParams", "generate", "greedy", "sample",
           "target_logprobs"]
