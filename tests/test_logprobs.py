"""Log-probabilities (OpenAI's logprobs / top_logprobs in chat, logprobs in completions): each
generated token's log-softmax under the model's raw logits and its likeliest alternatives; with
completions' echo, the prompt's tokens too (what evaluation harnesses score a text with).

The oracle is transformers: the same checkpoint run teacher-forced over the prompt and the
reply refmoe wrote gives, at every position, the log-softmax the server must report for that
token, and its top-k. Greedy and sampled (the sampled token need not be the likeliest; its
log-probability is still the model's), whole and streamed, chat and completions."""

import json

import httpx
import pytest
from conftest import write_random_chat_model
from test_server import Server, serving

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
def chunking(model_dir):
    """The same model behind an engine that chunks CPU prompts along decode steps and keeps a
    prefix cache: an echoed prompt must still run whole and from its first token."""
    s = Server(
        model_dir,
        engine_kwargs={"max_context": 256, "chunked_prefill": "on", "prefix_cache_gib": 0.1},
    )
    s.wait_ready()
    yield s
    s.stop()


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


def test_echo_scores_the_prompt_against_transformers(server, chunking, model_dir, oracle):
    tok = Tokenizer.from_dir(model_dir)
    text = "hello world, the experts"
    prompt = tok.encode(text, special=True)
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(m(torch.tensor([prompt])).logits[0].double(), -1)
    body = {"prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 2, "echo": True}
    for s in (server, chunking, chunking):  # the second time on the chunking engine: cached
        ch = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
        lp = ch["logprobs"]
        assert ch["text"].startswith(text) and len(lp["tokens"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1 : len(prompt)]
        assert got == pytest.approx(
            [float(want[i - 1, prompt[i]]) for i in range(1, len(prompt))], abs=1e-4
        )
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
        # the generated token after them, as without echo
        gen = ch["token_ids"][0]
        assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1, gen]), abs=1e-4)
    # streamed: the prompt's text and numbers come with the first chunk
    first = None
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and first is None:
                first = json.loads(line[6:])["choices"][0]
    assert first["text"].startswith(text) and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["tokens"]) == len(prompt) + 1
    # echo without logprobs: the text alone
    plain = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True}
    ch = httpx.post(server.url + "/v1/completions", json=plain, timeout=60).json()["choices"][0]
    assert ch["text"].startswith(tok.decode(prompt)) and ch["logprobs"] is None


def test_echo_logits_are_bounded(server, monkeypatch):
    """An echo with logprobs keeps [prompt, vocab] float32 logits: past the bound (2 GiB;
    here set to five tokens' worth) it is refused by name, and a plain echo is not."""
    from refmoe import engine

    monkeypatch.setattr(engine, "MAX_PROMPT_LOGIT_BYTES", 5 * 4 * 600)
    body = {"prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 1, "echo": True, "logprobs": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and "at most 5 prompt tokens" in r.text
    r = httpx.post(server.url + "/v1/completions", json={**body, "logprobs": None}, timeout=60)
    assert r.status_code == 200
