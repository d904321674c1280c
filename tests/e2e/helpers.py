"""Assertions shared by the e2e tests."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from conftest import PRICES, SOURCE, expected_cost

TOKEN_FIELDS = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_write_input_tokens",
    "cache_write_1h_input_tokens",
    "output_tokens",
    "reasoning_output_tokens",
)


def tokens(ev: dict[str, Any]) -> dict[str, int]:
    d = ev["data"]
    return {k: d.get(k) for k in TOKEN_FIELDS}


def assert_tokens(ev: dict[str, Any], **want: int) -> None:
    got = tokens(ev)
    sub = {k: got[k] for k in want}
    assert sub == want, f"event tokens {got} != expected {want}; event: {ev}"


def assert_mock_usage(ev: dict[str, Any], mock_entry: dict[str, Any]) -> None:
    """The event's tokens equal the usage the mock reported for that request."""
    usage = mock_entry.get("usage")
    assert usage is not None, f"mock reported no usage for {mock_entry}"
    assert tokens(ev) == {k: usage[k] for k in TOKEN_FIELDS}, (
        f"event tokens {tokens(ev)} != mock usage {usage}; event: {ev}"
    )


def assert_cost(ev: dict[str, Any], model: str) -> None:
    d = ev["data"]
    assert isinstance(d.get("cost"), str), f"cost must be a decimal string: {d.get('cost')!r}"
    want = expected_cost(model, d)
    got = Decimal(d["cost"])
    assert got == want, f"cost {d['cost']} != {want} (model {model}, tokens {tokens(ev)})"
    assert d.get("currency") == "USD", d
    assert d.get("unpriced") is False, f"unpriced should be false for {model}: {d}"


def assert_call(
    ev: dict[str, Any],
    *,
    tenant: str = "acme",
    upstream: str,
    provider: str,
    operation: str,
    stream: bool,
    outcome: str = "ok",
    usage_source: str = "provider",
    http_status: int | None = 200,
    request_model: str | None = None,
    response_model: str | None = None,
) -> None:
    d = ev["data"]
    assert ev.get("type") == "llm.call", ev
    assert ev.get("subject") == tenant, ev
    assert ev.get("source") == SOURCE, ev
    got = {
        "tenant": d.get("tenant"),
        "upstream": d.get("upstream"),
        "provider": d.get("provider"),
        "operation": d.get("operation"),
        "stream": d.get("stream"),
        "outcome": d.get("outcome"),
        "usage_source": d.get("usage_source"),
    }
    want = {
        "tenant": tenant,
        "upstream": upstream,
        "provider": provider,
        "operation": operation,
        "stream": stream,
        "outcome": outcome,
        "usage_source": usage_source,
    }
    assert got == want, f"event {got} != expected {want}; event: {ev}"
    if http_status is not None:
        assert d.get("http_status") == http_status, d
    if request_model is not None:
        assert d.get("request_model") == request_model, d
    if response_model is not None:
        assert d.get("response_model") == response_model, d
    assert d.get("calls") == 1, d


__all__ = [
    "PRICES",
    "TOKEN_FIELDS",
    "assert_call",
    "assert_cost",
    "assert_mock_usage",
    "assert_tokens",
    "tokens",
]
