"""Credentials, header hygiene and the proxy's own error responses."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from conftest import (
    ACME_KEY,
    ALL_SECRETS,
    GLOBEX_KEY,
    MAX_REQUEST_BYTES,
    TENANT_KEYS,
    UPSTREAM_KEY,
    WRONG_KEY,
    find_secrets,
)

MODEL = "gpt-4o-mini"
MSGS = [{"role": "user", "content": "Say hello."}]
CHAT = json.dumps({"model": MODEL, "messages": MSGS}).encode()
MESSAGES = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": MSGS}).encode()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_openai_error(r, status: int) -> dict:
    assert r.status == status, r
    assert (r.header("content-type") or "").startswith("application/json"), r
    body = r.json()
    err = body.get("error")
    assert isinstance(err, dict), body
    assert {"message", "type", "code"} <= set(err), body
    assert isinstance(err["message"], str) and err["message"], body
    return err


def assert_anthropic_error(r, status: int) -> dict:
    assert r.status == status, r
    assert (r.header("content-type") or "").startswith("application/json"), r
    body = r.json()
    assert body.get("type") == "error", body
    err = body.get("error")
    assert isinstance(err, dict) and {"type", "message"} <= set(err), body
    return err


def rejected_auth_count(stack) -> int:
    return sum(1 for e in stack.events() if e["data"].get("outcome") == "rejected_auth")


# ------------------------------------------------------------- auth


def test_wrong_key_openai_sdk(stack):
    before = rejected_auth_count(stack)
    client = stack.openai(key=WRONG_KEY)
    with pytest.raises(openai.AuthenticationError) as ei:
        client.chat.completions.create(model=MODEL, messages=MSGS)
    err = ei.value
    assert err.status_code == 401
    body = err.response.json()
    assert isinstance(body.get("error"), dict), body
    assert {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["code"], body
    assert WRONG_KEY not in err.response.text
    evs = stack.wait_events(
        lambda e: e["data"].get("outcome") == "rejected_auth", count=before + 1,
        what="rejected_auth event (openai)",
    )
    ev = evs[-1]
    assert ev["data"]["usage_source"] == "none", ev
    assert ev["data"]["http_status"] == 401, ev
    assert WRONG_KEY not in json.dumps(ev)


def test_wrong_key_anthropic_sdk(stack):
    before = rejected_auth_count(stack)
    client = stack.anthropic(key=WRONG_KEY)
    with pytest.raises(anthropic.AuthenticationError) as ei:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=MSGS)
    err = ei.value
    assert err.status_code == 401
    body = err.response.json()
    assert body.get("type") == "error", body
    assert isinstance(body.get("error"), dict) and body["error"].get("type"), body
    assert "message" in body["error"], body
    stack.wait_events(
        lambda e: e["data"].get("outcome") == "rejected_auth", count=before + 1,
        what="rejected_auth event (anthropic)",
    )


def test_missing_credential_is_401(stack):
    assert_openai_error(stack.raw("POST", "/openai/v1/chat/completions", CHAT), 401)
    assert_anthropic_error(stack.raw("POST", "/anthropic/v1/messages", MESSAGES), 401)


def test_tenant_key_of_other_scheme_rejected(stack):
    """A valid key with a wrong scheme, or an empty bearer, is not a credential."""
    r = stack.raw("POST", "/openai/v1/chat/completions", CHAT, {"authorization": ACME_KEY})
    assert r.status == 401, r
    r = stack.raw("POST", "/openai/v1/chat/completions", CHAT, {"authorization": "Bearer "})
    assert r.status == 401, r


def test_tenant_header_ignored_in_key_mode(stack):
    """In key mode x-tollgate-tenant must neither pick the tenant nor reach upstream."""
    client = stack.openai(key=ACME_KEY)
    resp = client.chat.completions.create(
        model=MODEL, messages=MSGS, extra_headers={"x-tollgate-tenant": "globex"}
    )
    ev = stack.event_for(resp._request_id)
    assert ev["subject"] == "acme" and ev["data"]["tenant"] == "acme", ev
    entry = stack.mock_entry(resp._request_id)
    assert not [h for h in entry["headers"] if h.lower().startswith("x-tollgate")], entry


def test_upstream_gets_only_the_upstream_key(stack):
    """Each SDK's credential is replaced, on its own route's header."""
    o = stack.openai(key=GLOBEX_KEY).chat.completions.create(model=MODEL, messages=MSGS)
    e = stack.mock_entry(o._request_id)
    assert e["authorization"] == f"Bearer {UPSTREAM_KEY}", e
    assert e["x_api_key"] in (None, UPSTREAM_KEY), e
    a = stack.anthropic(key=GLOBEX_KEY).messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=MSGS
    )
    e = stack.mock_entry(a._request_id)
    assert e["x_api_key"] == UPSTREAM_KEY, e
    assert e["authorization"] in (None, f"Bearer {UPSTREAM_KEY}"), e


def test_responses_never_contain_secrets(stack):
    """Raw headers and bodies of successes, streams and errors."""
    stream_body = json.dumps({"model": MODEL, "messages": MSGS, "stream": True}).encode()
    calls = [
        ("POST", "/openai/v1/chat/completions", CHAT, bearer(ACME_KEY)),
        ("POST", "/openai/v1/chat/completions", stream_body, bearer(ACME_KEY)),
        ("POST", "/anthropic/v1/messages", MESSAGES, {"x-api-key": ACME_KEY,
                                                      "anthropic-version": "2023-06-01"}),
        ("POST", "/openai/v1/chat/completions", CHAT, bearer(WRONG_KEY)),
        ("POST", "/anthropic/v1/messages", MESSAGES, {"x-api-key": WRONG_KEY}),
        ("POST", "/openai/v1/chat/completions", CHAT, {**bearer(ACME_KEY), "x-mock-status": "401"}),
        ("POST", "/openai/v1/chat/completions", CHAT, {**bearer(ACME_KEY), "x-mock-status": "500"}),
        ("GET", "/openai/v1/models", None, bearer(ACME_KEY)),
        ("POST", "/openai/v1/nope", CHAT, bearer(ACME_KEY)),
        ("GET", "/nope", None, bearer(ACME_KEY)),
        ("POST", "/dead/v1/chat/completions", CHAT, bearer(ACME_KEY)),
    ]
    for method, path, body, headers in calls:
        r = stack.raw(method, path, body, headers)
        blob = "\n".join(f"{k}: {v}" for k, v in r.headers) + "\n" + r.body.decode(errors="replace")
        leaked = find_secrets(blob)
        assert not leaked, f"{method} {path} -> {r.status} leaks {leaked}:\n{blob[:2000]}"


# ------------------------------------------------------------- routing and limits


def test_unknown_route_is_404_json(stack):
    for path in ("/nope", "/", "/openaix/v1/chat/completions", "/v1/chat/completions"):
        r = stack.raw("POST", path, CHAT, bearer(ACME_KEY))
        assert r.status == 404, (path, r)
        assert (r.header("content-type") or "").startswith("application/json"), (path, r)
        r.json()


def test_malformed_json_is_400(stack):
    bad = b'{"model": "gpt-4o-mini", "messages": [ oops'
    before = len(stack.mock_requests())
    assert_openai_error(stack.raw("POST", "/openai/v1/chat/completions", bad, bearer(ACME_KEY)), 400)
    assert_anthropic_error(
        stack.raw("POST", "/anthropic/v1/messages", bad, {"x-api-key": ACME_KEY}), 400
    )
    # Rejected at the proxy: the upstream never saw them.
    assert len(stack.mock_requests()) == before


def test_body_over_max_request_bytes_is_413(stack):
    filler = "x" * (MAX_REQUEST_BYTES + 100 * 1024)
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]}).encode()
    assert len(big) > MAX_REQUEST_BYTES
    before = len(stack.mock_requests())
    r = stack.raw("POST", "/openai/v1/chat/completions", big, bearer(ACME_KEY))
    assert_openai_error(r, 413)
    r = stack.raw("POST", "/anthropic/v1/messages", big, {"x-api-key": ACME_KEY})
    assert_anthropic_error(r, 413)
    assert len(stack.mock_requests()) == before


def test_chunked_body_over_max_request_bytes_is_413(stack):
    filler = "x" * (MAX_REQUEST_BYTES + 100 * 1024)
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]}).encode()
    before = len(stack.mock_requests())
    r = stack.raw("POST", "/openai/v1/chat/completions", big, bearer(ACME_KEY), chunked=True)
    assert_openai_error(r, 413)
    assert len(stack.mock_requests()) == before


def test_admin_health(stack):
    assert stack.raw("GET", "/healthz", addr=stack.admin_addr).status == 200
    assert stack.raw("GET", "/readyz", addr=stack.admin_addr).status == 200


# ------------------------------------------------------------- session-wide (run last)


def test_zz_mock_log_never_saw_a_tenant_credential(stack):
    entries = stack.mock_requests()
    assert entries, "the mock saw no requests"
    problems = []
    for e in entries:
        if e["path"].startswith("/__mock"):
            continue
        if e["authorization"] not in (None, f"Bearer {UPSTREAM_KEY}"):
            problems.append(("authorization", e))
        if e["x_api_key"] not in (None, UPSTREAM_KEY):
            problems.append(("x-api-key", e))
        if UPSTREAM_KEY not in (e["authorization"] or "") + (e["x_api_key"] or ""):
            problems.append(("no upstream key", e))
        if [h for h in e["headers"] if h.lower().startswith("x-tollgate")]:
            problems.append(("x-tollgate header", e))
        blob = json.dumps(e)
        if any(k in blob for k in [*TENANT_KEYS.values(), WRONG_KEY]):
            problems.append(("tenant key", e))
    assert not problems, problems[:5]


def test_zz_proxy_log_has_no_secrets(stack):
    text = stack.log_text()
    assert text, "the proxy printed nothing"
    leaked = [s for s in ALL_SECRETS if s in text]
    assert not leaked, f"proxy log {stack.proxy_log} contains {leaked}"
    # Nor any prompt or completion text.
    assert "Say hello." not in text and " hello hello" not in text
