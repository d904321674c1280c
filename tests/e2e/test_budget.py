"""A burst of concurrent agents through the real OpenAI SDK cannot spend past
a prepaid balance: reservations are taken before forwarding."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import openai

from conftest import TENANT_KEYS

LIMIT = Decimal("0.00025")


def tenant(stack, tid: str) -> dict:
    with urllib.request.urlopen(f"http://{stack.admin_addr}/v1/tenants/{tid}", timeout=10) as r:
        return json.loads(r.read())


def test_thirty_concurrent_calls_on_a_small_prepaid_balance(stack):
    client = stack.openai(key=TENANT_KEYS["prepaid"])

    def call(i: int):
        try:
            r = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                max_tokens=100,
                messages=[{"role": "user", "content": f"agent {i:02d} asks"}],
                extra_headers={
                    "x-mock-first-byte-delay-ms": "500",
                    "x-mock-output-tokens": "90",
                },
            )
            return 200, r.headers.get("x-request-id")
        except openai.APIStatusError as e:
            assert e.status_code == 402, e
            assert e.response.headers.get("x-should-retry") == "false"
            assert e.body["code"] == "budget_exceeded", e.body
            return 402, None

    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(call, range(30)))

    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 402}, statuses
    served = statuses.count(200)
    # Three worst cases (74.25 u$ each for this 95-byte body) fit in LIMIT
    # at once. A straggler that arrives after three calls settled at their
    # actual 57.6 u$ fits too (3 x 57.6 + 74.25 <= 250): at most four. What
    # must hold whatever the timing is below: spent <= LIMIT.
    assert 1 <= served <= 4, statuses

    mine = stack.wait_events(
        lambda e: e["subject"] == "prepaid",
        count=30,
        what="an event for each of the 30 calls",
    )
    assert len(mine) == 30
    assert sum(e["data"]["outcome"] == "ok" for e in mine) == served
    assert sum(e["data"]["outcome"] == "rejected_budget" for e in mine) == 30 - served
    ids = {rid for s, rid in results if s == 200}
    assert ids == {e["data"]["request_id"] for e in mine if e["data"]["outcome"] == "ok"}

    t = tenant(stack, "prepaid")
    spent = Decimal(t["spent"])
    assert spent <= LIMIT, (spent, LIMIT)
    assert spent == sum(Decimal(e["data"]["cost"]) for e in mine)
    assert t["reserved"] == "0"
