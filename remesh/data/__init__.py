"""Datasets (prompt / SFT / preference) and packing of variable-length sequences."""

from remesh.data.datasets import (
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    SkipReport,
    load_preference_dataset,
    load_prompt_dataset,
    load_sft_dataset,
    prompt_response_ids,
    split_eval,
)
from remesh.data.packing import PackedBatch, balanced_micro_batches, pack_sequences, shifted_targets, target_loss_mask

__all__ = [
    "DataError",
    "PreferenceExample",
    "PromptExample",
    "SFTExample",
    "SkipReport",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_sft_dataset",
    "prompt_response_ids",
    "split_eval",
    "PackedBatch",
    "balanced_micro_batches",
    "pack_sequences",
    "shifted_targets",
    "target_loss_mask",
]
