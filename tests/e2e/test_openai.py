"""The real `openai` SDK through tollgate: usage in events equals what the
SDK saw (and what the mock reported), cost follows DESIGN §7."""

from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest

from conftest import ACME_KEY, GLOBEX_KEY
from helpers import assert_call, assert_cost, assert_mock_usage, assert_tokens

MODEL = "gpt-4o-mini"
RESPONSE_MODEL = "gpt-4o-mini-2024-07-18"
MSGS = [{"role": "user", "content": "Say hello."}]


def rid_of(stream) -> str:
    rid = stream.response.headers.get("x-request-id")
    assert rid, f"no x-request-id in {dict(stream.response.headers)}"
    return rid


# ------------------------------------------------------------- chat


def test_chat_non_streamed_cached_and_reasoning(stack):
    client = stack.openai()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MSGS,
        extra_headers={
            "x-mock-output-tokens": "12",
            "x-mock-cached-tokens": "5",
            "x-mock-reasoning-tokens": "4",
        },
    )
    rid = raw.headers.get("x-request-id")
    assert rid and rid.startswith("req_"), dict(raw.headers)
    resp = raw.parse()
    assert resp._request_id == rid
    assert resp.model == RESPONSE_MODEL
    assert resp.choices[0].message.content == " hello" * 8
    u = resp.usage
    assert u is not None
    assert u.completion_tokens == 12
    assert u.prompt_tokens_details.cached_tokens == 5
    assert u.completion_tokens_details.reasoning_tokens == 4

    ev = stack.event_for(rid)
    assert_call(
        ev,
        upstream="openai",
        provider="openai",
        operation="chat",
        stream=False,
        request_model=MODEL,
        response_model=RESPONSE_MODEL,
    )
    assert_tokens(
        ev,
        input_tokens=u.prompt_tokens,
        cache_read_input_tokens=u.prompt_tokens_details.cached_tokens,
        cache_write_input_tokens=0,
        output_tokens=u.completion_tokens,
        reasoning_output_tokens=u.completion_tokens_details.reasoning_tokens,
    )
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


def test_event_envelope_and_fields(stack):
    """DESIGN §6: the CloudEvents envelope and every v1 data field."""
    client = stack.openai()
    resp = client.chat.completions.create(model=MODEL, messages=MSGS)
    ev = stack.event_for(resp._request_id)
    for k in ("specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data"):
        assert k in ev, f"envelope lacks {k}: {ev}"
    assert ev["specversion"] == "1.0"
    assert ev["datacontenttype"] == "application/json"
    assert isinstance(ev["id"], str) and len(ev["id"]) == 26, ev["id"]  # ULID
    assert isinstance(ev["time"], str) and ev["time"].endswith("Z"), ev["time"]
    d = ev["data"]
    want = {
        "schema_version": str,
        "tenant": str,
        "upstream": str,
        "provider": str,
        "operation": str,
        "request_model": str,
        "response_model": str,
        "request_id": str,
        "http_status": int,
        "stream": bool,
        "outcome": str,
        "usage_source": str,
        "input_tokens": int,
        "cache_read_input_tokens": int,
        "cache_write_input_tokens": int,
        "cache_write_1h_input_tokens": int,
        "output_tokens": int,
        "reasoning_output_tokens": int,
        "calls": int,
        "cost": str,
        "currency": str,
        "price_version": str,
        "unpriced": bool,
        "duration_ms": int,
    }
    problems = [
        f"{k}: {d.get(k)!r}" for k, t in want.items() if not isinstance(d.get(k), t)
    ]
    assert not problems, f"bad data fields {problems}; data: {d}"
    assert "ttft_ms" in d, d
    assert d["schema_version"] == "1"
    assert d["price_version"], d
    # Never any prompt or completion text.
    blob = json.dumps(ev)
    assert "Say hello" not in blob and " hello hello" not in blob, blob


def test_chat_streamed_with_include_usage(stack):
    client = stack.openai()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-cached-tokens": "3", "x-mock-reasoning-tokens": "2"},
    )
    rid = rid_of(stream)
    chunks = list(stream)
    assert chunks, "no chunks"
    last = chunks[-1]
    assert last.choices == [], f"last chunk should be the usage chunk: {last}"
    assert last.usage is not None, last
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " hello" * 6
    u = last.usage

    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="chat", stream=True,
                response_model=RESPONSE_MODEL)
    assert_tokens(
        ev,
        input_tokens=u.prompt_tokens,
        cache_read_input_tokens=u.prompt_tokens_details.cached_tokens,
        cache_write_input_tokens=0,
        output_tokens=u.completion_tokens,
        reasoning_output_tokens=u.completion_tokens_details.reasoning_tokens,
    )
    assert (u.completion_tokens, u.prompt_tokens_details.cached_tokens) == (8, 3)
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)
    assert isinstance(ev["data"].get("ttft_ms"), int), ev["data"]


def test_chat_streamed_without_include_usage(stack):
    """The proxy injects include_usage upstream and strips the usage chunk
    again: the client sees exactly what it asked for, the event still has
    provider usage."""
    client = stack.openai()
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    rid = rid_of(stream)
    chunks = list(stream)
    assert chunks
    assert all(c.usage is None for c in chunks), [c for c in chunks if c.usage is not None]
    assert all(c.choices for c in chunks), "a chunk with empty choices reached the client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == " hello" * 8

    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="chat", stream=True)
    entry = stack.mock_entry(rid)
    assert_mock_usage(ev, entry)
    assert ev["data"]["output_tokens"] == 8
    assert_cost(ev, MODEL)


def test_chat_streamed_without_include_usage_raw_bytes(stack):
    """Same as above, on the wire: no usage object, the stream ends in [DONE]."""
    body = json.dumps({"model": MODEL, "messages": MSGS, "stream": True}).encode()
    r = stack.raw(
        "POST",
        "/openai/v1/chat/completions",
        body,
        {"authorization": f"Bearer {ACME_KEY}"},
    )
    assert r.status == 200, r
    text = r.body.decode()
    assert '"usage":{' not in text.replace(" ", ""), text
    assert '"choices":[]' not in text.replace(" ", ""), text
    assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    ev = stack.event_for(r.header("x-request-id"))
    assert ev["data"]["usage_source"] == "provider", ev
    assert ev["data"]["output_tokens"] == 8, ev


def test_chat_streamed_include_usage_false(stack):
    """include_usage explicitly false: treated like absent."""
    client = stack.openai()
    stream = client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": False}
    )
    rid = rid_of(stream)
    chunks = list(stream)
    assert all(c.usage is None and c.choices for c in chunks)
    ev = stack.event_for(rid)
    assert ev["data"]["usage_source"] == "provider", ev
    assert_mock_usage(ev, stack.mock_entry(rid))


def test_legacy_completions_streamed(stack):
    client = stack.openai()
    stream = client.completions.create(
        model=MODEL, prompt="Say hello.", stream=True, extra_headers={"x-mock-output-tokens": "5"}
    )
    rid = rid_of(stream)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " hello" * 5
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="completions", stream=True)
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


# ------------------------------------------------------------- responses


def test_responses_non_streamed(stack):
    client = stack.openai()
    resp = client.responses.create(
        model=MODEL,
        input="Say hello.",
        extra_headers={"x-mock-cached-tokens": "4", "x-mock-reasoning-tokens": "3",
                       "x-mock-output-tokens": "10"},
    )
    rid = resp._request_id
    assert rid
    assert resp.output_text == " hello" * 7
    u = resp.usage
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="responses", stream=False,
                response_model=RESPONSE_MODEL)
    assert_tokens(
        ev,
        input_tokens=u.input_tokens,
        cache_read_input_tokens=u.input_tokens_details.cached_tokens,
        cache_write_input_tokens=0,
        output_tokens=u.output_tokens,
        reasoning_output_tokens=u.output_tokens_details.reasoning_tokens,
    )
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


def test_responses_streamed(stack):
    client = stack.openai()
    stream = client.responses.create(
        model=MODEL,
        input="Say hello.",
        stream=True,
        extra_headers={"x-mock-cached-tokens": "2", "x-mock-reasoning-tokens": "1"},
    )
    rid = rid_of(stream)
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "response.completed", types
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == " hello" * 7
    u = events[-1].response.usage
    assert u is not None
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="responses", stream=True)
    assert_tokens(
        ev,
        input_tokens=u.input_tokens,
        cache_read_input_tokens=u.input_tokens_details.cached_tokens,
        cache_write_input_tokens=0,
        output_tokens=u.output_tokens,
        reasoning_output_tokens=u.output_tokens_details.reasoning_tokens,
    )
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


# ------------------------------------------------------------- embeddings


def test_embeddings(stack):
    client = stack.openai()
    model = "text-embedding-3-small"
    raw = client.embeddings.with_raw_response.create(model=model, input=["hello", "world"])
    rid = raw.headers.get("x-request-id")
    resp = raw.parse()
    assert len(resp.data) == 2
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="embeddings", stream=False,
                request_model=model)
    assert_tokens(
        ev,
        input_tokens=resp.usage.prompt_tokens,
        cache_read_input_tokens=0,
        cache_write_input_tokens=0,
        output_tokens=0,
        reasoning_output_tokens=0,
    )
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, model)


# ------------------------------------------------------------- tenants


def test_second_tenant_is_attributed(stack):
    client = stack.openai(key=GLOBEX_KEY)
    resp = client.chat.completions.create(model=MODEL, messages=MSGS)
    ev = stack.event_for(resp._request_id)
    assert_call(ev, tenant="globex", upstream="openai", provider="openai", operation="chat",
                stream=False)


def test_concurrent_calls_each_get_one_exact_event(stack):
    client = stack.openai()
    n = 16

    def one(i: int):
        if i % 2:
            s = client.chat.completions.create(
                model=MODEL, messages=MSGS, stream=True,
                extra_headers={"x-mock-output-tokens": str(i + 1)},
            )
            rid = rid_of(s)
            text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
            return rid, text, i + 1
        r = client.chat.completions.create(
            model=MODEL, messages=MSGS, extra_headers={"x-mock-output-tokens": str(i + 1)}
        )
        return r._request_id, r.choices[0].message.content, i + 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(n), timeout=60))
    for rid, text, out in results:
        assert text == " hello" * out
    rids = {rid for rid, _, _ in results}
    assert len(rids) == n
    evs = stack.wait_events(lambda e: e["data"].get("request_id") in rids, count=n,
                            what="concurrent events")
    assert len(evs) == n, f"expected exactly {n} events, got {len(evs)}"
    entries = {e["request_id"]: e for e in stack.mock_requests()}
    for ev in evs:
        assert ev["data"]["usage_source"] == "provider", ev
        assert_mock_usage(ev, entries[ev["data"]["request_id"]])
        assert_cost(ev, MODEL)
    assert len({ev["id"] for ev in evs}) == n, "event ids must be unique"


# ------------------------------------------------------------- failures


def test_stream_cut_by_upstream(stack):
    client = stack.openai()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        extra_headers={"x-mock-fail-after": "3", "x-mock-output-tokens": "8"},
    )
    rid = rid_of(stream)
    got = []
    error = None
    try:
        for c in stream:
            if c.choices:
                got.append(c.choices[0].delta.content or "")
    except Exception as e:  # the SDK may raise (APIConnectionError) or just end
        error = e
    finally:
        stream.close()
    text = "".join(got)
    assert text in {" hello" * k for k in range(4)}, text
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="chat", stream=True,
                outcome="upstream_error", usage_source="estimated", http_status=None)
    assert ev["data"]["output_tokens"] == 3, (ev, error)
    assert ev["data"]["input_tokens"] > 0, ev
    assert stack.mock_entry(rid)["usage"] is None
    assert_cost(ev, MODEL)


def test_client_abort_mid_stream(stack):
    client = stack.openai()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        extra_headers={"x-mock-delay-ms": "200", "x-mock-output-tokens": "20"},
    )
    rid = rid_of(stream)
    started = time.monotonic()
    it = iter(stream)
    seen = 0
    while seen < 2:
        c = next(it)
        if c.choices and c.choices[0].delta.content:
            seen += 1
    stream.close()
    assert time.monotonic() - started < 10
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="chat", stream=True,
                outcome="client_aborted", usage_source="estimated", http_status=None)
    assert 1 <= ev["data"]["output_tokens"] <= 20, ev
    assert ev["data"]["output_tokens"] >= 2, ev  # the client saw two " hello"s
    assert_cost(ev, MODEL)


def test_upstream_error_status_is_passed_through(stack):
    client = stack.openai()
    with pytest.raises(openai.InternalServerError) as ei:
        client.chat.completions.create(
            model=MODEL, messages=MSGS, extra_headers={"x-mock-status": "500"}
        )
    err = ei.value
    assert err.status_code == 500
    assert "x-mock-status" in err.response.json()["error"]["message"]
    rid = err.response.headers.get("x-request-id")
    ev = stack.event_for(rid)
    assert_call(ev, upstream="openai", provider="openai", operation="chat", stream=False,
                outcome="upstream_error", usage_source="none", http_status=500)
    assert ev["data"]["output_tokens"] == 0, ev


def test_upstream_unreachable_is_502(stack):
    before = len(stack.events())
    r = stack.raw(
        "POST",
        "/dead/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MSGS}).encode(),
        {"authorization": f"Bearer {ACME_KEY}"},
    )
    assert r.status == 502, r
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err), err
    evs = stack.wait_events(
        lambda e: e["data"].get("upstream") == "dead", what="event for the dead upstream"
    )
    ev = evs[-1]
    assert ev["data"]["http_status"] == 502, ev
    assert ev["data"]["usage_source"] == "none", ev
    assert ev["data"]["outcome"] == "upstream_error", ev
    assert len(stack.events()) > before

