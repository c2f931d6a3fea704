"""Rollout generation: sampling distributions (pure functions) and the batched KV-cache sampler."""

from remesh.rollout.sampler import Rollout, generate, greedy
from remesh.rollout.sampling import SamplingParams, sample, target_logprobs

__all__ = ["Rollout", "SamplingParams", "generate", "greedy", "sample", "target_logprobs"]
