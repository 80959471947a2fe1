"""Log-probabilities (OpenAI's logprobs / top_logprobs in chat, logprobs in completions): each
generated token's log-softmax under the model's raw logits and its likeliest alternatives.

The oracle is transformers: the same checkpoint run teacher-forced over the prompt and the
reply refmoe wrote gives, at every position, the log-softmax the server must report for that
token, and its top-k. Greedy and sampled (the sampled token need not be the likeliest; its
log-probability is still the model's), whole and streamed, chat and completions."""

import json

import httpx
import pytest
from conftest import write_random_chat_model
from test_server import serving

from refmoe.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("logprobs")
    write_random_chat_model(d)
    return d


@pytest.fixture(scope="module")
def server(model_dir):
    yield from serving(model_dir)


@pytest.fixture(scope="module")
def oracle(model_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(prompt: list[int], reply: list[int]) -> torch.Tensor:
        """[len(reply), V]: the log-softmax that chose each reply token."""
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logits = m(ids).logits[0].double()
        return torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) + len(reply) - 1]

    return logprobs


def check(entries, want, k, text):
    """entries: [(logprob, [(alternative's text, logprob)])] against the oracle's rows and the
    reply's token ids; text: id -> its text."""
    for (tid, lp, top), row in zip(entries, want):
        assert lp == pytest.approx(float(row[tid]), abs=1e-4)
        assert len(top) == k
        values, ids = torch.topk(row, k)
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        # the alternatives by name, in order, unless two values tie within the tolerance
        for (got, _), wid, v in zip(top, ids.tolist(), values.tolist()):
            ties = [text(i) for i in range(row.numel()) if abs(float(row[i]) - v) < 1e-4]
            assert got == text(wid) or got in ties


def test_chat_logprobs_against_transformers(server, model_dir, oracle):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.encode(tok.apply_chat_template(ASK), special=False)
    for temperature, seed in ((0.0, None), (1.0, 3)):
        r = oa.chat.completions.create(
            model="tiny",
            messages=ASK,
            max_tokens=12,
            temperature=temperature,
            seed=seed,
            logprobs=True,
            top_logprobs=5,
        )
        ch = r.choices[0]
        ids, content = ch.model_extra["token_ids"], ch.logprobs.content
        assert len(content) == len(ids)
        # each token by its text and bytes, as OpenAI names them
        assert [c.token for c in content] == [tok.decode([i]) for i in ids]
        assert [bytes(c.bytes).decode() for c in content] == [c.token for c in content]
        entries = [
            (i, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
            for i, c in zip(ids, content)
        ]
        check(entries, oracle(prompt, ids), 5, lambda i: tok.decode([i]))
        if temperature == 0:  # greedy: every token is the likeliest
            assert all(c.logprob == c.top_logprobs[0].logprob for c in content)
    # streamed: the same numbers, chunk by chunk
    got, ids = [], []
    for chunk in oa.chat.completions.create(
        model="tiny",
        messages=ASK,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    ):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                got += [c.logprob for c in ch.logprobs.content]
                ids += ch.model_extra.get("token_ids") or []
    want = oracle(prompt, ids)
    assert len(got) == len(ids) > 0
    assert got == pytest.approx([float(w[i]) for w, i in zip(want, ids)], abs=1e-4)
    # without top_logprobs: the chosen token's alone
    r = oa.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)


def test_completion_logprobs_against_transformers(server, model_dir, oracle):
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.encode("hello world", special=True)
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 3}
    ch = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    ids, lp = ch["token_ids"], ch["logprobs"]
    want = oracle(prompt, ids)
    assert len(lp["token_logprobs"]) == len(ids)
    for i, v, top, row in zip(ids, lp["token_logprobs"], lp["top_logprobs"], want):
        assert v == pytest.approx(float(row[i]), abs=1e-4)
        # {text: logprob}: each alternative's value is one of the tokens spelled that way
        for text, x in top.items():
            spelled = [float(row[j]) for j in range(row.numel()) if tok.decode([j]) == text]
            assert any(x == pytest.approx(y, abs=1e-4) for y in spelled)
        assert max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids))]
    # streamed: offsets run on across chunks
    offsets = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                if c.get("logprobs"):
                    offsets += c["logprobs"]["text_offset"]
    assert offsets == lp["text_offset"]
