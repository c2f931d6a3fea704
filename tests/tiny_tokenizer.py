"""Test helper: a tiny byte-level BPE tokenizer built offline (no model hub).

Import it as `from tests.tiny_tokenizer import tiny_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML like SmolLM2's, with a shorter default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Solve 12 + 30. The answer is 42.",
    "Please write a short poem about the sea and the sky.",
    "user assistant system hello world thank you question answer",
    "def add(a, b):\n    return a + b\n",
] * 4


def tiny_tokenizer(tmp_path: str | Path, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab <= 512; every byte is in the alphabet so any text encodes) saved
    with save_pretrained to tmp_path and reloaded with AutoTokenizer.from_pretrained.
    eos is <|im_end|> with a chat template, <|endoftext|> without; pad is <|endoftext|>; no bos."""
    # Imported here, not at module level: when this file stands in for the library (see the
    # guard above), transformers is half-imported at that point.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    out = Path(tmp_path) / ("tok_chat" if chat_template else "tok_plain")
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)
