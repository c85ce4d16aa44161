"""The OpenAI surface (issue 16), spoken to by the official `openai` client against a real
`ragblend serve` (random tiny-smol weights: answers are gibberish, what is tested is the
serving): the conversation in the prompt after the chunks, `stop`, `logprobs`, `seed`,
`/v1/completions`, unknown models and fields refused by name. Also the offline `/docs` page and
uploads deduplicated by content."""
from __future__ import annotations

import re

import httpx
import pytest

from tests.test_api import doc_text, index, launch, wait_job

pytestmark = pytest.mark.real  # tiny-smol speaks the bundled tokenizer
MODEL = "random:tiny-smol"
QUESTION = "Which town has a railway museum?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = launch(tmp_path_factory.mktemp("oa"), "--chunk-tokens", "32", "--max-tokens", "64")
    for i, tag in enumerate("abc"):
        index(s.http, id=f"doc-{tag}", text=doc_text(tag, 1))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)


def chat(client, messages, **kw):
    extra = {"mode": "reuse", "top_k": 32, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=kw.pop("max_tokens", 12),
                                          temperature=kw.pop("temperature", 0), extra_body=extra, **kw)


def test_system_message_and_two_earlier_turns_go_after_the_chunks(client, server):
    plain = chat(client, [{"role": "user", "content": QUESTION}])
    talk = chat(client, [{"role": "system", "content": "Answer in one short sentence."},
                         {"role": "user", "content": "Tell me about the bridge."},
                         {"role": "assistant", "content": "It crosses the river."},
                         {"role": "user", "content": "And the harbour?"},
                         {"role": "assistant", "content": "It freezes in winter."},
                         {"role": "user", "content": QUESTION}])
    # Every chunk is retrieved both times (top_k 32): the prompt grows by exactly the question part…
    grown = talk.usage.prompt_tokens - plain.usage.prompt_tokens
    from transformers import AutoTokenizer

    from blend.loader import bundled_model_dir
    tok = AutoTokenizer.from_pretrained(bundled_model_dir())
    part = ("Instructions: Answer in one short sentence.\n\nConversation so far:\nUser: Tell me about the bridge.\n"
            "Assistant: It crosses the river.\nUser: And the harbour?\nAssistant: It freezes in winter.\n\n")
    assert grown == len(tok.encode(part + f"Question: {QUESTION}", add_special_tokens=False)) - len(
        tok.encode(f"Question: {QUESTION}", add_special_tokens=False))
    # …and the head and every chunk are still served from cached KV (reuse: all but the question part)
    assert talk.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens_details.cached_tokens > 0
    assert len(talk.model_extra["ragblend"]["chunks"]) == 3


def test_a_tool_message_and_a_message_after_the_question_are_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="no tools"):
        chat(client, [{"role": "user", "content": "x"}, {"role": "tool", "content": "y", "tool_call_id": "1"},
                      {"role": "user", "content": QUESTION}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]"):
        chat(client, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "prefill"}])


def test_stop_cuts_the_answer_streamed_and_not(client):
    ask = [{"role": "user", "content": QUESTION}]
    full = chat(client, ask, max_tokens=24).choices[0].message.content
    assert len(full) >= 8, full
    stop = full[4:7]
    cut = full[:full.find(stop)]
    done = chat(client, ask, max_tokens=24, stop=[stop, "\x07never"])
    assert done.choices[0].message.content == cut and done.choices[0].finish_reason == "stop"
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens <= 24
    chunks = list(chat(client, ask, max_tokens=24, stop=stop, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens


def test_logprobs_streamed_and_not(client):
    ask = [{"role": "user", "content": QUESTION}]
    done = chat(client, ask, logprobs=True, top_logprobs=3, extra_body={"mode": "full"})
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens > 0
    assert "".join(c.token for c in content) == done.choices[0].message.content
    for c in content:  # greedy, full attention: every token is its position's best, within float error
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-3)
        assert bytes(c.bytes) == c.token.encode()
    chunks = list(chat(client, ask, logprobs=True, top_logprobs=3, extra_body={"mode": "full"}, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_seed_makes_sampling_repeatable(client):
    ask = [{"role": "user", "content": QUESTION}]
    runs = [chat(client, ask, temperature=1.0, seed=7, max_tokens=16).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]


def test_completions_create_streamed_and_not(client):
    done = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=12, temperature=0, logprobs=2,
                                     extra_body={"mode": "full", "top_k": 32})
    choice = done.choices[0]
    assert done.object == "text_completion" and choice.finish_reason in ("stop", "length") and choice.text
    assert len(choice.logprobs.tokens) == done.usage.completion_tokens
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    # the same question in chat form is the same prompt: the same greedy answer
    assert choice.text == chat(client, [{"role": "user", "content": QUESTION}],
                               extra_body={"mode": "full"}).choices[0].message.content
    stream = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"mode": "full", "top_k": 32})
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_an_unknown_model_is_not_found(client):
    import openai

    for call in (lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}]),
                 lambda: client.completions.create(model="gpt-4o", prompt="x")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and "random:tiny-smol" in e.value.message
    assert chat(client, [{"role": "user", "content": "x"}], max_tokens=1).choices  # "ragblend" is an alias too
    assert client.chat.completions.create(model="ragblend", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=1).choices


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("response_format", {"type": "json_object"}), ("n", 2), ("logit_bias", {"50256": -100})])
def test_fields_ragblend_cannot_honour_are_a_400_naming_them(client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError, match=rf"^Error code: 400 - {field}: ragblend cannot honour") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], **{field: value})
    assert e.value.param == field
    if field != "tools":
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model=MODEL, prompt="x", extra_body={field: value})
    # their neutral values are fine
    neutral = {"n": 1, "logit_bias": {},
               "response_format": {"type": "text"}}.get(field)
    if neutral is not None:
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                              **{field: neutral}).choices


PENALTIES = {"frequency_penalty": 1.0, "presence_penalty": 0.5}


def test_penalties_are_honoured_on_every_route(client, server):
    """The same penalties give the same answer through /v1/query and /v1/completions (one prompt),
    and change what chat answers; vLLM's repetition_penalty comes as extra_body."""
    body = {"question": QUESTION, "mode": "full", "top_k": 32, "max_tokens": 16}
    plain = server.http.post("/v1/query", json=body).json()["answer"]
    rest = server.http.post("/v1/query", json={**body, **PENALTIES, "repetition_penalty": 1.3}).json()["answer"]
    assert rest != plain
    done = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=16, temperature=0, **PENALTIES,
                                     extra_body={"mode": "full", "top_k": 32, "repetition_penalty": 1.3})
    assert done.choices[0].text == rest
    talk = [{"role": "user", "content": QUESTION}]
    assert (chat(client, talk, max_tokens=16, **PENALTIES, extra_body={"repetition_penalty": 1.3})
            .choices[0].message.content != chat(client, talk, max_tokens=16).choices[0].message.content)


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -3),
                                         ("repetition_penalty", 0)])
def test_out_of_range_penalties_are_refused_naming_the_field(server, field, value):
    r = server.http.post("/v1/query", json={"question": QUESTION, field: value})
    assert r.status_code == 422 and field in r.text


def test_docs_page_and_its_assets_are_served_without_a_cdn(server):
    page = server.http.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources  # nothing from another host
    for path in sources:
        r = server.http.get(path)
        assert r.status_code == 200 and len(r.content) > 1000, path
    assert server.http.get("/redoc").status_code == 200 and "https://" not in server.http.get("/redoc").text.split(
        "<body>")[0]


def test_the_same_text_posted_and_uploaded_fills_one_retrieval_slot(server):
    """JSON without an id is named by its text's hash (sent again: the same document); an upload
    by its file name. The same text both ways is two documents, but one passage in the answer's
    sources."""
    http = server.http
    text = doc_text("dup", 1, "quagga")
    first = http.post("/v1/documents", json={"text": text})
    again = http.post("/v1/documents", json={"text": text})
    upload = http.post("/v1/documents", files={"file": ("same.txt", text.encode())})
    ids = [r.json()["doc_ids"][0] for r in (first, again, upload)]
    assert ids[0] == ids[1] and ids[0].startswith("sha256:") and ids[2] == "same.txt"
    for r in (first, again, upload):
        assert wait_job(http, r.json()["job_id"])["status"] == "succeeded"
    listed = [d["doc_id"] for d in http.get("/v1/documents", params={"limit": 1000}).json()["documents"]]
    assert listed.count(ids[0]) == 1 and "same.txt" in listed
    chunks = http.post("/v1/query", json={"question": "quagga", "top_k": 32, "max_tokens": 1}).json()["chunks"]
    texts = [c["text"] for c in chunks]
    assert len(texts) == len(set(texts)) and {c["doc_id"] for c in chunks} & {ids[0], "same.txt"}
    other = http.post("/v1/documents", json={"text": text + " More."}).json()["doc_ids"][0]
    assert other != ids[0]
