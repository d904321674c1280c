"""End-to-end harness: `tollgate mock` (the fake upstream) and `tollgate run`
(the proxy in front of it), both on ephemeral 127.0.0.1 ports, driven by the
real `openai` and `anthropic` SDKs.

Everything here is bounded in time: every wait has a deadline, every process
is killed on teardown. Nothing ever leaves 127.0.0.1.

The binary comes from $TOLLGATE_BIN (default target/debug/tollgate); this
harness never builds it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parents[2]

UPSTREAM_KEY = "sk-upstream-test-KEY"
TENANT_KEYS = {
    "acme": "tk-acme-SECRET-1",
    "globex": "tk-globex-SECRET-2",
    "prepaid": "tk-prepaid-SECRET-3",
}
# Extra keys of a tenant's table. `prepaid` holds a small prepaid balance:
# three worst-case reservations of test_budget.py's request fit, four do not.
TENANT_EXTRA = {
    "prepaid": ['budget = { limit = "0.00025", window = "total" }'],
}
ACME_KEY = TENANT_KEYS["acme"]
GLOBEX_KEY = TENANT_KEYS["globex"]
WRONG_KEY = "tk-nobody-SECRET-9"
ALL_SECRETS = [UPSTREAM_KEY, *TENANT_KEYS.values(), WRONG_KEY]

SOURCE = "tollgate/e2e"
MAX_REQUEST_BYTES = 1_048_576

# USD per million tokens, as written into the config (and used by the tests'
# own cost arithmetic). Missing cache prices default to `input` (DESIGN §3).
PRICES: dict[str, dict[str, str]] = {
    "gpt-4o-mini": {"input": "0.15", "cache_read_input": "0.075", "output": "0.60"},
    "text-embedding-3-small": {"input": "0.02", "output": "0"},
    "claude-sonnet-4-5": {
        "input": "3",
        "cache_read_input": "0.30",
        "cache_write_input": "3.75",
        "cache_write_1h_input": "6",
        "output": "15",
    },
}
MAX_OUTPUT = {"gpt-4o-mini": 16384}

STARTUP_TIMEOUT = 15.0  # seconds for a process to print its listening line
EVENT_TIMEOUT = 10.0  # seconds for an event to reach the file sink
STOP_TIMEOUT = 10.0  # seconds for SIGTERM before SIGKILL
HTTP_TIMEOUT = 20.0  # seconds for any single HTTP call
TEST_TIMEOUT = int(os.environ.get("TOLLGATE_E2E_TEST_TIMEOUT", "90"))  # per test (SIGALRM backstop)


def pytest_configure(config: pytest.Config) -> None:
    # The SDKs warn about model deprecations; the model names are fixed by the config.
    config.addinivalue_line(
        "filterwarnings", "ignore:The model .* is deprecated:DeprecationWarning"
    )


class E2ETestTimeout(Exception):
    pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Every test is bounded even if something blocks outside an SDK timeout."""

    def on_alarm(signum, frame):
        raise E2ETestTimeout(f"{item.nodeid} took longer than {TEST_TIMEOUT}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        return (yield)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def key_digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------- cost


def expected_cost(model: str, ev_or_usage: dict[str, Any]) -> Decimal:
    """DESIGN §7: exact cost in USD from the config prices (per 1M tokens)."""
    d = ev_or_usage.get("data", ev_or_usage)
    p = PRICES[model]
    inp = Decimal(p["input"])
    cr = Decimal(p.get("cache_read_input", p["input"]))
    cw = Decimal(p.get("cache_write_input", p["input"]))
    cw1h = Decimal(p.get("cache_write_1h_input", cw))
    out = Decimal(p["output"])
    i = d["input_tokens"]
    r = d["cache_read_input_tokens"]
    w = d["cache_write_input_tokens"]
    w1h = d["cache_write_1h_input_tokens"]
    o = d["output_tokens"]
    return ((i - r - w) * inp + r * cr + (w - w1h) * cw + w1h * cw1h + o * out) / Decimal(
        1_000_000
    )


# ---------------------------------------------------------------- processes


def binary() -> Path:
    raw = os.environ.get("TOLLGATE_BIN", "target/debug/tollgate")
    p = Path(raw)
    if not p.is_absolute():
        p = REPO / p
    return p


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # No stray credentials or config from the caller's shell.
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "TOLLGATE_")) and k != "RUST_LOG"
    }
    # The default log level unless asked otherwise (the secret scan then also
    # covers that level): TOLLGATE_E2E_RUST_LOG=debug scripts/e2e.sh
    if os.environ.get("TOLLGATE_E2E_RUST_LOG"):
        env["RUST_LOG"] = os.environ["TOLLGATE_E2E_RUST_LOG"]
    env.setdefault("RUST_BACKTRACE", "1")
    env["NO_COLOR"] = "1"
    return env


def _json_lines(path: Path) -> Iterable[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _log_field(obj: dict[str, Any], name: str) -> Any:
    """A field of a tracing JSON line, top-level or under `fields`."""
    if name in obj:
        return obj[name]
    fields = obj.get("fields")
    if isinstance(fields, dict):
        return fields.get(name)
    return None


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(lines[-n:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: Any

    def wait_for_line(self, message: str, timeout: float = STARTUP_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for obj in _json_lines(self.log_path):
                if _log_field(obj, "message") == message:
                    return obj
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before logging "
                    f"{message!r}; log:\n{tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not log {message!r} within {timeout}s; log:\n"
                    f"{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> int | None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                try:
                    self.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
        try:
            self.log_file.close()
        except Exception:
            pass
        return self.popen.returncode


def spawn(name: str, args: list[str], env: dict[str, str], log_path: Path) -> Proc:
    bin_path = binary()
    if not bin_path.is_file():
        pytest.exit(f"no tollgate binary at {bin_path} (build it first)", returncode=2)
    log_file = open(log_path, "wb")
    popen = subprocess.Popen(
        [str(bin_path), *args],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(log_path.parent),
    )
    return Proc(name, popen, log_path, log_file)


def closed_port() -> int:
    """A loopback port nothing listens on (for the unreachable upstream)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(tmp: Path, mock_addr: str, dead_addr: str) -> str:
    lines = [
        "[server]",
        'listen = "127.0.0.1:0"',
        'admin_listen = "127.0.0.1:0"',
        f"data_dir = {json.dumps(str(tmp / 'data'))}",
        f"source = {json.dumps(SOURCE)}",
        f"max_request_bytes = {MAX_REQUEST_BYTES}",
        'shutdown_grace = "5s"',
        "",
        "[spool]",
        'fsync = "never"',
        "",
        "[tenancy]",
        'mode = "key"',
        "",
    ]
    for name, prefix, provider, env_name, addr in [
        ("openai", "/openai", "openai", "OPENAI_API_KEY", mock_addr),
        ("anthropic", "/anthropic", "anthropic", "ANTHROPIC_API_KEY", mock_addr),
        ("dead", "/dead", "openai", "OPENAI_API_KEY", dead_addr),
    ]:
        lines += [
            "[[upstreams]]",
            f'name = "{name}"',
            f'prefix = "{prefix}"',
            f'url = "http://{addr}"',
            f'provider = "{provider}"',
            f'api_key_env = "{env_name}"',
            "",
        ]
    for model, prices in PRICES.items():
        lines.append(f'[models."{model}"]')
        for k, v in prices.items():
            lines.append(f'{k} = "{v}"')
        if model in MAX_OUTPUT:
            lines.append(f"max_output_tokens = {MAX_OUTPUT[model]}")
        lines.append("")
    for tenant, key in TENANT_KEYS.items():
        lines += [
            "[[tenants]]",
            f'id = "{tenant}"',
            f'keys = ["{key_digest(key)}"]',
            *TENANT_EXTRA.get(tenant, []),
            "",
        ]
    lines += [
        "[[sinks]]",
        'type = "file"',
        f"path = {json.dumps(str(tmp / 'events.jsonl'))}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    tmp: Path
    mock_addr: str
    proxy_addr: str
    admin_addr: str
    events_path: Path
    proxy_log: Path
    mock_log: Path
    proxy: Proc
    mock: Proc
    config_path: Path
    dead_addr: str
    _clients: list[Any] = field(default_factory=list)

    # --- SDK clients

    def openai(self, key: str = ACME_KEY, **kw: Any):
        import openai

        c = openai.OpenAI(
            base_url=f"http://{self.proxy_addr}/openai/v1",
            api_key=key,
            max_retries=0,
            timeout=HTTP_TIMEOUT,
            **kw,
        )
        self._clients.append(c)
        return c

    def anthropic(self, key: str = ACME_KEY, **kw: Any):
        import anthropic

        c = anthropic.Anthropic(
            base_url=f"http://{self.proxy_addr}/anthropic",
            api_key=key,
            max_retries=0,
            timeout=HTTP_TIMEOUT,
            **kw,
        )
        self._clients.append(c)
        return c

    # --- raw HTTP (stdlib, so we see exact bytes)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        addr: str | None = None,
        chunked: bool = False,
    ) -> "RawResponse":
        host, port = (addr or self.proxy_addr).rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
        try:
            hdrs = dict(headers or {})
            if body is not None and not chunked:
                hdrs.setdefault("content-type", "application/json")
            send_error = None
            try:
                if chunked:
                    hdrs.setdefault("content-type", "application/json")
                    conn.putrequest(method, path)
                    for k, v in hdrs.items():
                        conn.putheader(k, v)
                    conn.putheader("transfer-encoding", "chunked")
                    conn.endheaders()
                    step = 64 * 1024
                    for i in range(0, len(body or b""), step):
                        part = body[i : i + step]
                        conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    conn.send(b"0\r\n\r\n")
                else:
                    conn.request(method, path, body=body, headers=hdrs)
            except (BrokenPipeError, ConnectionResetError) as e:
                # The server may answer (413) and close before reading it all.
                send_error = e
            try:
                resp = conn.getresponse()
            except (ConnectionResetError, http.client.RemoteDisconnected) as e:
                raise AssertionError(
                    f"{method} {path}: no response (send error: {send_error!r}): {e!r}"
                ) from e
            data = resp.read()
            return RawResponse(resp.status, resp.getheaders(), data)
        finally:
            conn.close()

    # --- the mock's request log

    def mock_requests(self) -> list[dict[str, Any]]:
        r = self.raw("GET", "/__mock/requests", addr=self.mock_addr)
        assert r.status == 200, r
        return json.loads(r.body)

    def mock_entry(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.mock_requests():
                if e.get("request_id") == request_id:
                    return e
            if time.monotonic() > deadline:
                raise AssertionError(f"mock log has no request {request_id}")
            time.sleep(0.05)

    # --- events from the file sink

    def events(self) -> list[dict[str, Any]]:
        try:
            text = self.events_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        # Only complete lines: the sink may be mid-write.
        complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def wait_events(
        self,
        pred: Callable[[dict[str, Any]], bool],
        count: int = 1,
        timeout: float = EVENT_TIMEOUT,
        what: str = "events",
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if pred(e)]
            if len(found) >= count:
                return found
            if self.proxy.popen.poll() is not None:
                raise AssertionError(
                    f"proxy exited ({self.proxy.popen.returncode}) while waiting for {what}; "
                    f"log:\n{tail(self.proxy_log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: wanted {count}, found {len(found)} within {timeout}s "
                    f"({len(self.events())} events in {self.events_path}); proxy log tail:\n"
                    f"{tail(self.proxy_log, 20)}"
                )
            time.sleep(0.05)

    def event_for(self, request_id: str, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        assert request_id, "no request id to look up"
        found = self.wait_events(
            lambda e: (e.get("data") or {}).get("request_id") == request_id,
            timeout=timeout,
            what=f"event with request_id {request_id}",
        )
        assert len(found) == 1, f"{len(found)} events for {request_id}: {found}"
        return found[0]

    def log_text(self) -> str:
        try:
            return self.proxy_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.headers!r}, {self.body[:500]!r})"


def find_secrets(text: str) -> list[str]:
    return [s for s in ALL_SECRETS if s in text]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tollgate-e2e")
    (tmp / "data").mkdir()
    procs: list[Proc] = []
    try:
        mock_env = _base_env()
        mock_env["TOLLGATE_MOCK_EXPECT_KEY"] = UPSTREAM_KEY
        mock_log = tmp / "mock.log"
        mock = spawn("mock", ["mock", "--listen", "127.0.0.1:0"], mock_env, mock_log)
        procs.append(mock)
        mock_addr = _log_field(mock.wait_for_line("mock listening"), "addr")
        assert isinstance(mock_addr, str) and mock_addr.startswith("127.0.0.1:"), mock_addr

        dead_addr = f"127.0.0.1:{closed_port()}"
        config_path = tmp / "tollgate.toml"
        config_path.write_text(render_config(tmp, mock_addr, dead_addr))

        proxy_env = _base_env()
        proxy_env["OPENAI_API_KEY"] = UPSTREAM_KEY
        proxy_env["ANTHROPIC_API_KEY"] = UPSTREAM_KEY
        proxy_log = tmp / "proxy.log"
        proxy = spawn("proxy", ["run", "--config", str(config_path)], proxy_env, proxy_log)
        procs.append(proxy)
        line = proxy.wait_for_line("listening")
        proxy_addr = _log_field(line, "proxy")
        admin_addr = _log_field(line, "admin")
        assert isinstance(proxy_addr, str) and proxy_addr.startswith("127.0.0.1:"), line
        assert isinstance(admin_addr, str) and admin_addr.startswith("127.0.0.1:"), line

        s = Stack(
            tmp=tmp,
            mock_addr=mock_addr,
            proxy_addr=proxy_addr,
            admin_addr=admin_addr,
            events_path=tmp / "events.jsonl",
            proxy_log=proxy_log,
            mock_log=mock_log,
            proxy=proxy,
            mock=mock,
            config_path=config_path,
            dead_addr=dead_addr,
        )
        yield s
        for c in s._clients:
            try:
                c.close()
            except Exception:
                pass
    finally:
        for p in reversed(procs):
            p.stop()
    # After shutdown (the proxy logs its last lines on SIGTERM): no secret
    # anywhere in what it printed.
    leaked = find_secrets(proxy_log.read_text(errors="replace")) if procs[1:] else []
    print(f"\n[e2e] proxy log: {tmp / 'proxy.log'}  events: {tmp / 'events.jsonl'}")
    assert not leaked, f"proxy log leaks secrets {leaked}: {tmp / 'proxy.log'}"
