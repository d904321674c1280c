"""The real `anthropic` SDK through tollgate: Anthropic reports input without
cache, the event adds the three (DESIGN §6); cost follows DESIGN §7."""

from __future__ import annotations

import anthropic
import pytest

from helpers import assert_call, assert_cost, assert_mock_usage, assert_tokens

MODEL = "claude-sonnet-4-5"
MSGS = [{"role": "user", "content": "Say hello."}]
CACHE_HEADERS = {
    "x-mock-cached-tokens": "5",
    "x-mock-cache-write-tokens": "7",
    "x-mock-cache-write-1h-tokens": "3",
    "x-mock-output-tokens": "9",
}


def write_1h(usage) -> int:
    """The cache writes kept an hour, as the SDK reads them."""
    return (usage.cache_creation.ephemeral_1h_input_tokens or 0) if usage.cache_creation else 0


def expect_usage(ev, usage) -> None:
    cache_read = usage.cache_read_input_tokens or 0
    cache_write = usage.cache_creation_input_tokens or 0
    assert_tokens(
        ev,
        input_tokens=usage.input_tokens + cache_read + cache_write,
        cache_read_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
        cache_write_1h_input_tokens=write_1h(usage),
        output_tokens=usage.output_tokens,
        reasoning_output_tokens=0,
    )


def test_messages_non_streamed_with_cache(stack):
    client = stack.anthropic()
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=1024, messages=MSGS, extra_headers=CACHE_HEADERS
    )
    rid = raw.headers.get("request-id")
    assert rid and rid.startswith("req_"), dict(raw.headers)
    msg = raw.parse()
    assert msg._request_id == rid
    assert msg.model == MODEL
    assert msg.content[0].text == " hello" * 9
    u = msg.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (5, 7, 9)
    assert write_1h(u) == 3

    ev = stack.event_for(rid)
    assert_call(ev, upstream="anthropic", provider="anthropic", operation="messages",
                stream=False, request_model=MODEL, response_model=MODEL)
    expect_usage(ev, u)
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


def test_messages_stream_helper(stack):
    client = stack.anthropic()
    with client.messages.stream(
        model=MODEL, max_tokens=1024, messages=MSGS, extra_headers=CACHE_HEADERS
    ) as s:
        rid = s.request_id
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert rid
    assert text == " hello" * 9
    u = final.usage
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (5, 7, 9)

    ev = stack.event_for(rid)
    assert_call(ev, upstream="anthropic", provider="anthropic", operation="messages",
                stream=True, response_model=MODEL)
    expect_usage(ev, u)
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)
    assert isinstance(ev["data"].get("ttft_ms"), int), ev["data"]


def test_messages_create_stream_true(stack):
    client = stack.anthropic()
    stream = client.messages.create(
        model=MODEL,
        max_tokens=1024,
        messages=MSGS,
        stream=True,
        extra_headers={"x-mock-cached-tokens": "11", "x-mock-output-tokens": "4"},
    )
    rid = stream.response.headers.get("request-id")
    assert rid
    start_usage = None
    out = None
    text = ""
    types = []
    for event in stream:
        types.append(event.type)
        if event.type == "message_start":
            start_usage = event.message.usage
        elif event.type == "message_delta":
            out = event.usage.output_tokens
        elif event.type == "content_block_delta":
            text += event.delta.text
    assert types[0] == "message_start" and types[-1] == "message_stop", types
    assert text == " hello" * 4
    assert start_usage is not None and out == 4

    ev = stack.event_for(rid)
    assert_call(ev, upstream="anthropic", provider="anthropic", operation="messages", stream=True)
    cache_read = start_usage.cache_read_input_tokens or 0
    cache_write = start_usage.cache_creation_input_tokens or 0
    assert_tokens(
        ev,
        input_tokens=start_usage.input_tokens + cache_read + cache_write,
        cache_read_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
        cache_write_1h_input_tokens=write_1h(start_usage),
        output_tokens=out,
        reasoning_output_tokens=0,
    )
    assert_mock_usage(ev, stack.mock_entry(rid))
    assert_cost(ev, MODEL)


def test_messages_max_tokens_caps_output(stack):
    client = stack.anthropic()
    msg = client.messages.create(
        model=MODEL, max_tokens=3, messages=MSGS, extra_headers={"x-mock-output-tokens": "8"}
    )
    assert msg.stop_reason == "max_tokens"
    ev = stack.event_for(msg._request_id)
    assert ev["data"]["output_tokens"] == 3 == msg.usage.output_tokens, ev
    assert_mock_usage(ev, stack.mock_entry(msg._request_id))


def test_messages_stream_cut_by_upstream(stack):
    client = stack.anthropic()
    stream = client.messages.create(
        model=MODEL,
        max_tokens=1024,
        messages=MSGS,
        stream=True,
        extra_headers={"x-mock-fail-after": "3", "x-mock-output-tokens": "8"},
    )
    rid = stream.response.headers.get("request-id")
    try:
        for _ in stream:
            pass
    except Exception:  # the SDK may raise or just end early
        pass
    finally:
        stream.close()
    ev = stack.event_for(rid)
    assert_call(ev, upstream="anthropic", provider="anthropic", operation="messages",
                stream=True, outcome="upstream_error", usage_source="estimated",
                http_status=None)
    assert ev["data"]["output_tokens"] == 3, ev
    assert ev["data"]["input_tokens"] > 0, ev
    assert_cost(ev, MODEL)


def test_messages_upstream_overloaded(stack):
    client = stack.anthropic()
    with pytest.raises(anthropic.APIStatusError) as ei:
        client.messages.create(
            model=MODEL, max_tokens=1024, messages=MSGS, extra_headers={"x-mock-status": "529"}
        )
    assert ei.value.status_code == 529
    body = ei.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error", body
    ev = stack.event_for(ei.value.response.headers.get("request-id"))
    assert_call(ev, upstream="anthropic", provider="anthropic", operation="messages",
                stream=False, outcome="upstream_error", usage_source="none", http_status=529)
