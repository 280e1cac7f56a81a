"""`racer-local serve` on 127.0.0.1, driven by the official `openai` client and raw HTTP.

One server process on the embedded model serves the module (a second one checks the API
key, a third the queue limit). Every bad request gets a 400-family answer with an OpenAI
error body, and the server keeps answering afterwards.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from conftest import start_server as _start

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(model_path):
    proc, url = _start(model_path)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(server, client):
    (model,) = client.models.list().data
    assert model.id == "gemma-3-270m-q4_k_m"
    assert httpx.get(server + "/models").json()["data"][0]["id"] == model.id
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_plain_has_usage_and_timings(client):
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=8)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    t = r.model_extra["timings"]
    assert t["predicted_n"] == r.usage.completion_tokens and t["method"] == "racer"
    for name in ("prompt_n", "prompt_ms", "predicted_ms", "predicted_per_second", "draft_n",
                 "draft_n_accepted", "steps", "tokens_per_step"):
        assert name in t


def test_chat_streamed_with_usage(client):
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Count: one, two, three, four,"}], max_tokens=24,
        stream=True, stream_options={"include_usage": True}, extra_body={"method": "pld"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == chunks[-1].model_extra["timings"]["predicted_n"]
    steps = [c.model_extra["racer"]["step_tokens"] for c in chunks if c.model_extra.get("racer")]
    assert sum(steps) == chunks[-1].usage.completion_tokens and text
    assert chunks[-1].model_extra["timings"]["method"] == "pld"


def test_completions_and_stop_strings(client):
    r = client.completions.create(model="any", prompt="1. apples\n2. pears\n3.", max_tokens=30, stop=["\n"])
    assert r.object == "text_completion" and "\n" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    assert r.model_extra["timings"]["predicted_n"] == r.usage.completion_tokens


def test_seed_reproducibility(client):
    def sample():
        return client.completions.create(model="any", prompt="Once upon a time", max_tokens=16,
                                         temperature=0.9, seed=7).choices[0].text

    assert sample() == sample()


def test_frequency_and_presence_penalties_reach_the_sampler(client):
    """Chat apps send OpenAI's two penalties: they change what the model picks, here its greedy
    choice on a prompt that invites repeating itself ("apple, banana," again without them)."""
    prompt = "List some fruits: apple, banana, apple, banana,"

    def complete(**penalties):
        return client.completions.create(model="any", prompt=prompt, max_tokens=8, temperature=0,
                                         **penalties).choices[0].text

    plain = complete()
    assert complete(frequency_penalty=2.0) != plain and complete(presence_penalty=2.0) != plain
    assert complete(frequency_penalty=0.0, presence_penalty=0.0) == plain


def test_a_predicted_output_speeds_the_reply_not_its_text(client):
    """OpenAI's predicted outputs: the reply the client expects (here the reply itself, which
    the prompt does not hold) is drafted from, in far fewer steps, and the text is unchanged
    (a prompt without near-ties, where batched rows could flip a token: measured 33 to 8 steps)."""
    prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    ask = dict(model="any", prompt=prompt, max_tokens=48,
               extra_body={"method": "pld"})  # pld: no calibration carried between the requests
    plain = client.completions.create(**ask)
    text = plain.choices[0].text

    def predicted(content):
        body = {**ask["extra_body"], "prediction": {"type": "content", "content": content}}
        return client.completions.create(**{**ask, "extra_body": body})

    got = predicted(text)
    assert got.choices[0].text == text
    assert got.model_extra["timings"]["steps"] < plain.model_extra["timings"]["steps"] / 2
    parts = [{"type": "text", "text": text[:5]}, {"type": "text", "text": text[5:]}]
    assert predicted(parts).choices[0].text == text


def test_logit_bias_bans_a_token(client, engine):
    prompt = "List some fruits: apple, banana, apple, banana,"
    (apple,) = engine.backend.tokenize(" apple", add_special=False)

    def complete(**bias):
        return client.completions.create(model="any", prompt=prompt, max_tokens=8, temperature=0,
                                         **bias).choices[0].text

    assert complete().startswith(" apple")
    assert not complete(logit_bias={str(apple): -100}).startswith(" apple")


BAD = [
    (b"{not json", "invalid_json"),
    (json.dumps({"model": "m"}), "messages"),
    (json.dumps({"messages": "hi"}), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}), "context"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "method": "magic"}), "method"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 2.5}),
     "frequency_penalty"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999999": -100}}),
     "vocabulary"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"apple": -100}}),
     "logit_bias"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": -101}}), "logit_bias"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "prediction": "text"}), "prediction"),
    (json.dumps([1, 2]), "JSON object"),
]


@pytest.mark.parametrize("body,mentions", BAD)
def test_bad_requests_get_400_and_the_server_keeps_serving(server, client, body, mentions):
    r = httpx.post(server + "/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and mentions in json.dumps(err)
    assert client.models.list().data  # still serving


def test_a_huge_body_is_refused(server):
    r = httpx.post(server + "/v1/completions", content=b"x" * (5 << 20))
    assert r.status_code == 413 and "MiB" in r.json()["error"]["message"]


def test_unknown_path_is_a_json_404(server):
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_disconnect_mid_stream_frees_the_engine(server, client):
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 900,
            "stream": True, "method": "ar"}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 4:
                break  # the client goes away mid-reply
    started = time.monotonic()
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4)
    assert r.usage.completion_tokens >= 1
    # 900 tokens take tens of seconds; a cancelled stream frees the engine within a step or two
    assert time.monotonic() - started < 10


def test_a_follow_up_turn_reuses_the_kv_cache(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    first = client.chat.completions.create(model="any", messages=messages, max_tokens=8,
                                           extra_body={"method": "ar"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And three animals?"}]
    second = client.chat.completions.create(model="any", messages=messages, max_tokens=8)
    t = second.model_extra["timings"]
    assert t["cache_n"] >= first.usage.prompt_tokens  # the first turn was not evaluated again
    assert t["cache_n"] + t["prompt_n"] == second.usage.prompt_tokens


def test_two_concurrent_clients_are_both_answered(client):
    answers = {}

    def ask(i):
        answers[i] = client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [0, 1] and all(a.usage.completion_tokens >= 1 for a in answers.values())


def test_api_key_is_enforced(model_path):
    proc, url = _start(model_path, "--api-key", "s3cret")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).completions.create(
                model="m", prompt="x", max_tokens=1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_full_queue_answers_503_with_retry_after(model_path):
    proc, url = _start(model_path, "--max-queue", "1")
    try:
        body = {"messages": [{"role": "user", "content": "A long story:"}], "max_tokens": 300, "stream": True,
                "method": "ar"}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a collected iterator closes the stream, a disconnect
            next(lines)  # the first request holds the engine
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "queue_full"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_python_api_returns_the_same_shapes(engine):
    r = engine.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r["object"] == "chat.completion" and r["usage"]["completion_tokens"] == r["timings"]["predicted_n"]
    chunks = list(engine.create_completion(prompt="The sky is", max_tokens=4, stream=True))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "timings" in chunks[-1]
    from racer_local.openai_api import RequestError

    with pytest.raises(RequestError, match="max_tokens"):
        engine.create_completion(prompt="x", max_tokens=0)


def test_the_web_chat_page_is_served_and_self_contained(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "Stop" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
