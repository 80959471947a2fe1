"""Text prompts and chat templates through a real tokenizer.json."""

import json

import pytest
from conftest import cli_generate
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
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        eos_token_id=None,
    )
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
