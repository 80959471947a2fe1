"""The demo model's tokenizer and chat template, built with the `tokenizers` library (nothing
downloaded): byte-level BPE whose vocabulary is the 256 bytes, DeepSeek-V3's four chat special
tokens, and two-character merges of printable ASCII up to the demo's vocabulary size. Any token
id decodes to text, so `refmoe serve` on the demo answers chat messages; the demo's weights are
random, so that text is gibberish (the demo shows speed, not language)."""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-V3's turn layout, without its tool-call branches
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def write(directory: Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json for a model of vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 bytes, as characters
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = [BOS, EOS, USER, ASSISTANT]
    printable = [chr(c) for c in range(33, 127)]  # byte-level keeps these as they are
    merges: list[tuple[str, str]] = []
    room = vocab_size - len(vocab) - len(specials)
    for a in printable:
        for b in printable:
            if len(merges) >= room:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(directory / "tokenizer.json"))
    # tokenizer_class: the plain tokenizer.json under transformers' AutoTokenizer too, which
    # otherwise picks the family's class (Qwen2Tokenizer adds <|endoftext|> past the vocab)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": BOS,
                "eos_token": EOS,
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
