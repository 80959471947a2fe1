"""Kimi's tokenizer (Kimi-K2, K2-Thinking, K2.5, Moonlight) as Hugging Face tokenizers runs it.

Moonshot ships no tokenizer.json: `tiktoken.model` holds the BPE ranks (one `base64(bytes) rank`
line per token), tokenization_kimi.py the split pattern, and tokenizer_config.json's
added_tokens_decoder names some of the 256 special ids that follow the ranks (the rest are
`<|reserved_token_ID|>`). Here the same vocabulary becomes a byte-level BPE, so encoding,
decoding, special tokens and markup stay on refmoe's one Tokenizer class.

Why the merges reproduce tiktoken: tiktoken merges, at each step, the adjacent pair whose
concatenation has the lowest rank. Listing every split of every token into two vocabulary
tokens as a merge, ordered by the rank of the token it makes, gives the BPE model the same
choice at every step; `ignore_merges` takes a piece that is itself a token whole, as tiktoken
does first. tests/test_tokenizer.py holds the result against tiktoken itself.

tokenization_kimi.py also cuts a text before encoding, into pieces of at most 400,000
characters, and those at runs of more than 25,000 whitespace or non-whitespace characters (a
guard on tiktoken's time); no token crosses a cut. `cuts` makes the same pieces.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

# tokenization_kimi.py's pattern: Han runs on their own, and Han taken out of the letter classes
# so that the word branches stop at it (Oniguruma, which tokenizers uses, reads `&&` as
# class intersection, as tiktoken's regex does)
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
NUM_SPECIAL = 256  # ids len(ranks) .. len(ranks) + 255
MAX_CHARS = 400_000  # tokenization_kimi.py's pieces of a text
MAX_RUN = 25_000  # its longest run of whitespace, or of anything else, in one piece


def cuts(text: str) -> list[str]:
    """The pieces Kimi's tokenizer encodes one by one: MAX_CHARS at a time, each cut again
    wherever a run of whitespace or of non-whitespace reaches MAX_RUN + 1 characters (the
    run's next character starts a new piece)."""
    pieces = []
    for lo in range(0, max(len(text), 1), MAX_CHARS):
        chunk, start, run = text[lo : lo + MAX_CHARS], 0, 0
        space = chunk[:1].isspace()
        for i, ch in enumerate(chunk):
            if ch.isspace() != space:
                space, run = not space, 1
            else:
                run += 1
                if run > MAX_RUN:
                    pieces.append(chunk[start:i])
                    start, run = i, 1
        pieces.append(chunk[start:])
    return pieces


def byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b as one printable character (tokenizers' ByteLevel)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # printable bytes stand for themselves
    chars, shifted = [], 256
    for b in range(256):
        if chr(b) in alphabet:
            chars.append(chr(b))
        else:  # the others, in order, from U+0100 on
            chars.append(chr(shifted))
            shifted += 1
    return chars


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model: token bytes -> rank, ranks 0..n-1 each once, every single byte a token."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected `base64 rank`")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        if token in ranks:
            raise ValueError(f"{path}, line {n}: token {token!r} listed twice")
        ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single bytes are not tokens (first: {missing[0]:#04x}); "
            "a byte-level BPE needs all 256"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


def special_tokens(config: dict, first_id: int, where: str) -> dict[int, str]:
    """The 256 special ids after the ranks, named from added_tokens_decoder."""
    names = {i: f"<|reserved_token_{i}|>" for i in range(first_id, first_id + NUM_SPECIAL)}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (isinstance(key, str) and key.isdigit() and isinstance(content, str)):
            raise ValueError(f"{where}: added_tokens_decoder[{key!r}] needs an id and a content")
        if int(key) not in names:
            raise ValueError(
                f"{where}: added_tokens_decoder id {key} lies outside the special ids "
                f"{first_id}..{first_id + NUM_SPECIAL - 1} that follow tiktoken.model's ranks"
            )
        names[int(key)] = content
    return names


def build(path: Path, config: dict, where: str, bos: str = ""):
    """A tokenizers.Tokenizer equal to tiktoken over `path`'s ranks with Kimi's pattern; bos:
    the bos_token's text, put first where config asks for add_bos_token."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    ranks = read_ranks(path)
    chars = byte_chars()

    def spell(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []  # (rank of the product, left, right): every split into two tokens
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    bpe = models.BPE(
        {spell(t): r for t, r in ranks.items()},
        [(m[3], m[4]) for m in merges],
        ignore_merges=True,
    )
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    names = special_tokens(config, len(ranks), where)
    tok.add_special_tokens([AddedToken(names[i], special=True) for i in sorted(names)])
    for i, name in names.items():  # added tokens take the next free ids: check they did
        if tok.token_to_id(name) != i:
            raise ValueError(f"{where}: special token {name!r} named twice")
    if config.get("add_bos_token") and bos:
        bos_id = tok.token_to_id(bos)
        if bos_id is None:
            raise ValueError(f"{where}: bos_token {bos!r} is not a token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok
