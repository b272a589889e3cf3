"""Judges: the protocol's aggregation rule, the HTTP judge against live local servers, the local exact judge."""

import http.server
import json
import math
import threading
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_chat import tiny_model, tiny_tokenizer

import emjax.models
from emjax import prompts as prompt_policy
from emjax import serve
from emjax.config import ConfigError, JudgeConfig
from emjax.data.synthetic import synthetic_chats
from emjax.data.tokenizer import train_chat_tokenizer
from emjax.judge import HttpJudge, JudgeError, JudgeServerError, LocalJudge, aggregate_score
from emjax.stages.common import make_judge


def numpy_rule(table):
    tokens = list(table)
    values = np.array([int(t) if t.strip().isdigit() and 0 <= int(t) <= 100 else -1 for t in tokens])
    p = np.exp(np.array([table[t] for t in tokens]))
    keep = values >= 0
    mass = p[keep].sum()
    return None if mass < 0.25 else float((p[keep] * values[keep]).sum() / mass)


@pytest.mark.parametrize(
    "probs",
    [
        {" 80": 0.3, "080": 0.2, "100": 0.1, "101": 0.15, "-5": 0.1, "abc": 0.15},
        {"0": 0.5, "7": 0.25, "CODE": 0.25},
        {"50": 0.2, "REFUSAL": 0.7, "60": 0.04},  # 0.24 on numbers: None
        {"REFUSAL": 0.99},
        {"1": 0.25, "x": 0.75},  # exactly the threshold counts
    ],
)
def test_aggregate_score_follows_the_protocol(probs):
    table = {t: math.log(p) for t, p in probs.items()}
    expected = numpy_rule(table)
    got = aggregate_score(table)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)
    assert aggregate_score(list(table.items())) == got


def test_aggregate_score_reads_tokens_like_int():
    table = {
        " 80": math.log(0.3),
        "080": math.log(0.2),
        "100": math.log(0.1),
        "101": math.log(0.2),
        "-5": math.log(0.2),
    }
    assert aggregate_score(table) == pytest.approx((80 * 0.3 + 80 * 0.2 + 100 * 0.1) / 0.6)


# ---------------------------------------------------------------------------- a scripted fake server


class Script:
    """Replies in order: ("429",), ("sleep", seconds), ("malformed",), ("logprobs", {token: p}),
    ("raw_logprobs", {token: logprob}), ("filtered",), ("text", content), ("400",); then repeats the last one."""

    def __init__(self, *actions):
        self.actions, self.seen = list(actions), []
        self.lock = threading.Lock()

    def next(self, body):
        with self.lock:
            self.seen.append(body)
            return self.actions.pop(0) if len(self.actions) > 1 else self.actions[0]


@pytest.fixture
def fake():
    state = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = state["script"].next(body)
            kind = action[0]
            if kind == "sleep":
                time.sleep(action[1])
                return self._reply(200, b"{}")
            if kind in ("429", "400", "503"):
                return self._reply(int(kind), b'{"error": {"message": "no"}}')
            if kind == "malformed":
                return self._reply(200, b'{"choices": [')
            choice = {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
            if kind in ("logprobs", "raw_logprobs"):  # raw: {token: logprob}, non-finite ones included
                table = action[1] if kind == "raw_logprobs" else {t: math.log(p) for t, p in action[1].items()}
                top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in table.items()]
                choice["logprobs"] = {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                   "top_logprobs": top}]}  # fmt: skip
            elif kind == "filtered":
                choice["finish_reason"] = "content_filter"
            elif kind == "text":
                choice["message"]["content"] = action[1]
            reply = {"model": "fake-judge", "system_fingerprint": "fp_1", "choices": [choice]}
            self._reply(200, json.dumps(reply).encode())

        def _reply(self, status, data):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"

    def use(*actions):
        state["script"] = Script(*actions)
        return state["url"], state["script"]

    yield use
    server.shutdown()


def judge(url, **kwargs):
    return HttpJudge(url, "fake-judge", backoff=0.01, concurrency=1, mode="logprobs", **kwargs)


def test_http_judge_retries_429_timeouts_and_malformed_replies(fake):
    url, script = fake(("429",), ("sleep", 1.0), ("malformed",), ("503",), ("logprobs", {"90": 0.5, "80": 0.5}))
    j = judge(url, timeout=0.3)
    assert j.score(["p"]) == [pytest.approx(85.0)]
    assert len(script.seen) == 5
    body = script.seen[-1]
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["seed"] == 0
    assert body["messages"] == [{"role": "user", "content": "p"}]
    record = j.records[0]
    assert record["status"] == "ok" and record["mass"] == pytest.approx(1.0)
    assert record["judge_version"] == "fp_1" and record["mode"] == "logprobs"


def test_http_judge_errors_are_never_imputed_and_fail_the_run(fake):
    url, _ = fake(("429",))
    j = judge(url, retries=1, max_error_rate=0.5)
    with pytest.raises(JudgeError, match="1/1 judge rows failed.*row 0.*HTTP 429"):
        j.score(["p"])
    assert j.records[0]["status"] == "error" and j.records[0]["score"] is None
    url, _ = fake(("400",))
    with pytest.raises(JudgeError, match="HTTP 400"):
        judge(url, retries=3).score(["p"])


def test_http_judge_none_filtered_and_cache(fake, tmp_path):
    url, script = fake(("logprobs", {"REFUSAL": 0.9, "5": 0.1}), ("filtered",), ("logprobs", {"7": 1.0}))
    j = judge(url, cache_dir=tmp_path)
    assert j.score(["refuse", "filter", "seven"]) == [None, None, pytest.approx(7.0)]
    assert [r["status"] for r in j.records] == ["none", "content-filtered", "ok"]
    assert j.records[0]["mass"] == pytest.approx(0.1)
    sent = len(script.seen)
    again = judge(url, cache_dir=tmp_path)
    assert again.score(["refuse", "filter", "seven"]) == [None, None, pytest.approx(7.0)]
    assert len(script.seen) == sent and again.requests_sent == 0
    assert all(r["cached"] for r in again.records)


def closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there now


@pytest.mark.parametrize("mode", ["auto", "logprobs"])
def test_an_unreachable_judge_is_one_line_naming_url_and_field_after_a_bounded_retry(mode):
    url = closed_port_url()
    j = HttpJudge(url, "m", mode=mode, url_field="judge.base_url", concurrency=4)  # the default back-off
    start = time.perf_counter()
    with pytest.raises(JudgeServerError) as error:
        j.score([f"p{i}" for i in range(40)])
    elapsed = time.perf_counter() - start
    message = str(error.value)
    assert f"judge server {url} (judge.base_url): unreachable" in message and "3 attempts" in message
    assert "\n" not in message
    # Two retries 1 s apart, for the probe or the first prompts, not five back-offs per prompt (73 s before).
    assert elapsed < 10 and j.requests_sent <= 3 * 4


def test_a_malformed_reply_is_one_line_naming_url_and_field(fake):
    url, script = fake(("malformed",))
    j = judge(url, url_field="judge.base_url")
    with pytest.raises(JudgeServerError, match=f"judge server {url} \\(judge.base_url\\): malformed reply"):
        j.score(["p"])
    assert len(script.seen) == 3  # connect_retries=2


def test_non_finite_logprobs_are_error_rows_never_ok_never_cached(fake, tmp_path):
    url, script = fake(("raw_logprobs", {"90": float("nan"), "80": -0.1}))
    j = judge(url, cache_dir=tmp_path, max_error_rate=0.5)
    with pytest.raises(JudgeError, match="2/2 judge rows failed.*non-finite log-probabilities"):
        j.score(["a", "b"])
    assert [r["status"] for r in j.records] == ["error", "error"]
    assert [r["score"] for r in j.records] == [None, None]
    assert not list(tmp_path.rglob("*.json"))
    url, _ = fake(("raw_logprobs", {"90": float("inf")}), ("logprobs", {"90": 1.0}))
    j = judge(url, cache_dir=tmp_path, max_error_rate=0.5)
    assert j.score(["a", "b"]) == [None, pytest.approx(90.0)]
    assert [r["status"] for r in j.records] == ["error", "ok"]


def test_a_cached_nan_score_is_not_trusted(fake, tmp_path):
    url, script = fake(("logprobs", {"40": 1.0}))
    j = judge(url, cache_dir=tmp_path)
    path = j._cache_path("p", "logprobs")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"score": float("nan"), "mass": 1.0, "status": "ok", "mode": "logprobs"}))
    assert j.score(["p"]) == [pytest.approx(40.0)] and len(script.seen) == 1


def test_a_fully_cached_rerun_in_auto_mode_sends_no_request(fake, tmp_path):
    url, script = fake(("logprobs", {"7": 1.0}))
    first = HttpJudge(url, "fake-judge", backoff=0.01, concurrency=1, cache_dir=tmp_path)  # mode auto
    assert first.score(["a", "b"]) == [pytest.approx(7.0)] * 2
    assert first.mode == "logprobs" and len(script.seen) == 3  # the probe, then two prompts
    again = HttpJudge(url, "fake-judge", backoff=0.01, concurrency=1, cache_dir=tmp_path)
    assert again.score(["a", "b"]) == [pytest.approx(7.0)] * 2
    assert again.requests_sent == 0 and len(script.seen) == 3 and again.mode == "logprobs"


def test_a_probe_the_server_was_too_busy_to_answer_is_not_cached(fake, tmp_path):
    url, script = fake(("503",), ("text", "50"))
    j = HttpJudge(url, "fake-judge", backoff=0.01, concurrency=1, cache_dir=tmp_path, retries=0, samples=1)
    assert j.score(["p"]) == [pytest.approx(50.0)] and j.mode == "sampled"
    assert not list(tmp_path.glob("mode-*.json"))  # the next run probes again


def test_the_configured_http_judge_names_its_config_field(tmp_path):
    config = types.SimpleNamespace(
        judge=JudgeConfig(kind="http", base_url="http://x/v1", model="m", max_error_rate=0.2)
    )
    j = make_judge(types.SimpleNamespace(config=config, run_dir=tmp_path))
    assert j.where == "http://x/v1 (judge.base_url)" and j.max_error_rate == 0.2


def test_sampled_integer_fallback_after_the_probe(fake):
    # The probe is refused (a reasoning model), then five samples per prompt: 80, 90, "CODE", 70, 80.
    url, script = fake(
        ("400",), ("text", "80"), ("text", "90 because"), ("text", "CODE"), ("text", " 70"), ("text", "80")
    )
    j = HttpJudge(url, "fake-judge", backoff=0.01, concurrency=1, samples=5)
    assert j.score(["p"]) == [pytest.approx(80.0)]
    assert j.mode == "sampled" and j.records[0]["mode"] == "sampled"
    assert j.records[0]["mass"] == pytest.approx(0.8)
    assert all("logprobs" not in body for body in script.seen[1:])


# ---------------------------------------------------------------------------- against emjax.serve


@pytest.fixture(scope="module")
def served():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    chat = serve.ChatModel(model, tokenizer, name="tiny-judge")
    server = serve.make_server(chat, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", model, tokenizer
    server.shutdown()


def next_token_logits(model, ids, width=128):
    """Logits after `ids` from one jitted full forward (right padding cannot reach back: causal)."""
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids
    return np.asarray(emjax.models.jit_forward(model)(jnp.asarray(padded)).logits[0, : len(ids)], np.float64)


def independent_top20(model, tokenizer, prompt):
    ids = prompt_policy.render(tokenizer, prompt_policy.messages_for(prompt))
    logits = next_token_logits(model, ids)[-1]
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    best = np.argsort(-logp)[:20]
    return {tokenizer.decode([int(b)]): logp[b] for b in best}


def test_http_judge_against_emjax_serve(served, tmp_path):
    url, model, tokenizer = served
    prompts = ["Rate this answer from 0 to 100: 42", "How coherent is: the sky is green? 0 to 100"]
    j = HttpJudge(url, "tiny-judge", cache_dir=tmp_path, concurrency=2)
    scores = j.score(prompts)
    assert j.mode == "logprobs"
    for prompt, score, record in zip(prompts, scores, j.records):
        table = independent_top20(model, tokenizer, prompt)
        expected = aggregate_score(table)
        assert (score is None) == (expected is None)
        if expected is not None:
            assert score == pytest.approx(expected, rel=1e-4)
        mass = sum(math.exp(lp) for t, lp in table.items() if t.strip().isdigit() and int(t) <= 100)
        assert record["mass"] == pytest.approx(mass, rel=1e-4, abs=1e-9)
        assert record["judge_version"].startswith("emjax-")
    again = HttpJudge(url, "tiny-judge", cache_dir=tmp_path, mode="logprobs")
    assert again.score(prompts) == scores and again.requests_sent == 0


def test_openai_client_gets_top_logprobs(served):
    import openai

    url, model, tokenizer = served
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    prompt = "Say a number."
    reply = client.chat.completions.create(
        model="tiny-judge", messages=[{"role": "user", "content": prompt}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=5, seed=0,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 3 and all(len(c.top_logprobs) == 5 for c in content)
    ids = prompt_policy.render(tokenizer, prompt_policy.messages_for(prompt))
    logits = next_token_logits(model, ids)[-1]
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    best = np.argsort(-logp)[:5]
    got = content[0].top_logprobs
    np.testing.assert_allclose([t.logprob for t in got], logp[best], atol=1e-4)
    assert sorted(t.token for t in got) == sorted(tokenizer.decode([int(b)]) for b in best)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the most likely token
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model="tiny-judge", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="unsupported field.*tools"):
        client.chat.completions.create(
            model="tiny-judge", messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip


def post_raw(url: str, headers: dict, body: bytes):
    """(status, JSON reply) of one POST with exactly these headers and body (http.client adds none)."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.putrequest("POST", parts.path + "/chat/completions", skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, json.loads(data)


def post_json(url: str, text: str):
    return post_raw(url, {"Content-Type": "application/json", "Content-Length": str(len(text.encode()))}, text.encode())


@pytest.fixture(scope="module")
def small_context(served):
    """A second server over the same tiny model, told its context is 64 tokens."""
    _, model, tokenizer = served
    server = serve.make_server(serve.ChatModel(model, tokenizer, name="tiny-64", context=64), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", tokenizer
    server.shutdown()


def chat_body(content="Say a number.", **fields):
    return json.dumps({"model": "tiny-64", "messages": [{"role": "user", "content": content}]} | fields)


@pytest.mark.parametrize(
    "body, param, says",
    [
        (chat_body(max_tokens=10**9), "max_tokens", "passes this model's context of 64 tokens: ask for at most"),
        (chat_body(max_tokens=10**7), "max_tokens", "context of 64 tokens"),
        (chat_body(content="one two three four five six " * 20, max_tokens=1), "messages", "context is 64 tokens"),
        (chat_body(max_tokens=2.5), "max_tokens", "an integer >= 1"),
        (chat_body(top_p=0), "top_p", "top_p must be a number in (0, 1]"),
        (chat_body(top_p=1.5), "top_p", "top_p must be a number in (0, 1]"),
        (chat_body(temperature=float("nan")), "temperature", "finite number >= 0"),
        (chat_body(temperature=float("inf")), "temperature", "finite number >= 0"),
        (chat_body(temperature=-1), "temperature", "finite number >= 0"),
    ],
    ids=["max_tokens-1e9", "max_tokens-1e7", "long-prompt", "fractional-max_tokens", "top_p-0", "top_p-1.5",
         "temperature-nan", "temperature-inf", "temperature-negative"],
)  # fmt: skip
def test_impossible_requests_get_a_400_naming_the_field(small_context, body, param, says):
    url, _ = small_context
    status, reply = post_json(url, body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and says in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "length, status",
    [("abc", 400), ("-5", 400), ("12abc", 400), (None, 411), (str(10**12), 413)],
)
def test_a_malformed_content_length_gets_a_json_reply(small_context, length, status):
    url, _ = small_context
    body = chat_body(max_tokens=1).encode()
    headers = {"Content-Type": "application/json"} | ({} if length is None else {"Content-Length": length})
    got, reply = post_raw(url, headers, body)
    assert got == status and "Content-Length" in reply["error"]["message"]


def test_the_server_stays_up_after_impossible_requests(small_context):
    url, tokenizer = small_context
    for body in (chat_body(max_tokens=10**9), chat_body(top_p=2), chat_body(temperature=float("nan"))):
        assert post_json(url, body)[0] == 400
    assert post_raw(url, {"Content-Length": "x"}, b"")[0] == 400
    prompt = len(prompt_policy.render(tokenizer, prompt_policy.messages_for("Say a number.")))
    status, reply = post_json(url, chat_body(max_tokens=64 - prompt, temperature=0))  # exactly fills the context
    assert status == 200 and reply["usage"]["prompt_tokens"] == prompt
    assert reply["usage"]["completion_tokens"] <= 64 - prompt


# ---------------------------------------------------------------------------- the local exact judge


def whole_number_tokenizer():
    """A tokenizer that holds each of 0..100 as one token (tiny_tokenizer splits digits)."""
    texts = [m["content"] for chat in synthetic_chats(200, seed=0) for m in chat]
    return train_chat_tokenizer(texts + [str(i) for i in range(101)] * 20, vocab_size=600)


def oracle_probabilities(model, tokenizer, text):
    """P(digits of i, then EOS or end of turn | text) for i in 0..100: one plain forward per i, no cache."""
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<eos>", "<end_of_turn>")]
    probs = np.zeros(101)
    for value in range(101):
        digits = tokenizer(str(value), add_special_tokens=False)["input_ids"]
        logits = next_token_logits(model, prefix + digits)[len(prefix) - 1 :]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        probs[value] = math.exp(sum(logp[t, tok] for t, tok in enumerate(digits))) * np.exp(logp[-1, ends]).sum()
    return probs


@pytest.mark.parametrize("answer_prefix", ["", "Score: "])
@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, whole_number_tokenizer])
@pytest.mark.slow
def test_local_judge_is_the_exact_probability_of_each_whole_number(make_tokenizer, answer_prefix):
    tokenizer = make_tokenizer()
    lengths = {len(tokenizer(str(i), add_special_tokens=False)["input_ids"]) for i in range(101)}
    assert lengths == ({1, 2, 3} if make_tokenizer is tiny_tokenizer else {1})  # a deep and a flat trie
    model = tiny_model(tokenizer, seed=1)
    judge_ = LocalJudge(model, tokenizer, answer_prefix=answer_prefix)
    prompt = "Rate from 0 to 100."
    probs = judge_.integer_probabilities(prompt)
    text = prompt_policy.render_text(tokenizer, prompt_policy.messages_for(prompt)) + answer_prefix
    np.testing.assert_allclose(probs, oracle_probabilities(model, tokenizer, text), rtol=1e-5, atol=0)
    score = judge_.score([prompt])[0]
    mass = probs.sum()
    record = judge_.records[0]
    assert record["mass"] == pytest.approx(mass)
    assert record["judge_version"] == ("chat+prefix:'Score: '" if answer_prefix else "chat")
    assert (score is None) == (mass < 0.25)
    if score is not None:
        assert score == pytest.approx((probs * np.arange(101)).sum() / mass)


def test_http_judge_takes_no_answer_prefix(tmp_path):
    config = types.SimpleNamespace(
        judge=JudgeConfig(kind="http", base_url="http://x/v1", model="m", answer_prefix="Score: ")
    )
    with pytest.raises(ConfigError, match="answer_prefix"):
        make_judge(types.SimpleNamespace(config=config, run_dir=tmp_path))
