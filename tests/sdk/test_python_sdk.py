"""The official Rollgate Python SDK (PyPI `rollgate==1.2.3`, unmodified) with `base_url` = the proxy.

The SDK is asyncio-based; each test drives it with `asyncio.run` and every wait is bounded.
What each test relies on in the SDK comes from reading the installed wheel (`rollgate/client.py`,
`events.py`, `telemetry.py`): `init()` never raises (errors go to the `error` callback and leave
flags empty), the stream sends `Authorization: Bearer` and no `token`, its read timeout is the
5 s client timeout, and *any* data event replaces the whole flag map with `data.get("flags", {})`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import pytest
from rollgate import RetryConfig, RollgateClient, RollgateConfig, UserContext
from rollgate.errors import AuthenticationError
from rollgate.events import TrackEventOptions
from rollgate.reasons import EvaluationReasonKind

from harness import MOCK_API_KEY, Mock, Proxy, metric, wait_until

# The SDK's own key: without client keys the proxy accepts any, and never forwards it upstream.
SDK_KEY = "sdk-key-seen-only-by-the-proxy"


@dataclass
class Recorder:
    """Everything the SDK reported through its public callbacks."""

    flags_updated: list[dict[str, bool]] = field(default_factory=list)
    changed: list[tuple[str, Any, Any, float]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    change_event: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self, client: RollgateClient) -> None:
        client.on("flags_updated", lambda flags: self.flags_updated.append(dict(flags)))
        client.on("flag_changed", self._on_changed)
        client.on("error", self.errors.append)

    def _on_changed(self, key: str, new: Any, old: Any) -> None:
        self.changed.append((key, new, old, time.monotonic()))
        self.change_event.set()

    async def wait_change(self, key: str, value: Any, timeout_s: float) -> float:
        """Seconds until `flag_changed(key, value)` arrives (fails after `timeout_s`)."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            for k, v, _, at in self.changed:
                if k == key and v == value:
                    return at - start
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no flag_changed({key}={value}) within {timeout_s}s; saw {self.changed}")
            self.change_event.clear()
            try:
                await asyncio.wait_for(self.change_event.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def make_client(proxy: Proxy, *, streaming: bool = False, api_key: str = SDK_KEY, **cfg: Any) -> RollgateClient:
    return RollgateClient(
        RollgateConfig(api_key=api_key, base_url=proxy.url, enable_streaming=streaming, **cfg)
    )


async def streaming_client(proxy: Proxy, timeout_s: float) -> tuple[RollgateClient, Recorder]:
    """A streaming SDK client, initialised, once its stream's first snapshot arrived: `init()`
    fetches once, and the stream's first `init` event is the second update. Close it."""
    client = make_client(proxy, streaming=True)
    rec = Recorder()
    rec.attach(client)
    try:
        await client.init()
        await wait_async(lambda: len(rec.flags_updated) >= 2, timeout_s, "the stream's first snapshot")
    except BaseException:
        await client.close()
        raise
    return client, rec


def proxy_flags(proxy: Proxy, user: Optional[str] = None) -> dict[str, Any]:
    params = {"withReasons": "true"}
    if user:
        params["user_id"] = user
    return proxy.get_json("/api/v1/sdk/flags", params=params)


def mock_view(mock: Mock, user: Optional[str] = None) -> dict[str, Any]:
    return mock.control("GET", "flags" + (f"?user_id={user}" if user else ""))


async def wait_async(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def sdk_stream_gauge(proxy: Proxy) -> Optional[float]:
    """Open SDK streams at the proxy, if the proxy exports such a gauge."""
    text = proxy.metrics()
    for name, labels in (
        ("rollgate_proxy_sse_clients", 'stream="sdk"'),
        ("rollgate_proxy_sse_clients", 'kind="sdk"'),
        ("rollgate_proxy_sse_clients", 'route="sdk"'),
    ):
        v = metric(text, name, labels)
        if v is not None:
            return v
    return None


# ---------------------------------------------------------------------------------------------


def test_init_reads_the_proxys_flags(mock: Mock, proxy: Proxy) -> None:
    expected = mock_view(mock)["flags"]
    assert expected["enabled-flag"] is True and expected["disabled-flag"] is False

    async def run() -> None:
        client = make_client(proxy)
        rec = Recorder()
        rec.attach(client)
        try:
            await client.init()
            assert rec.errors == []
            assert client.get_all_flags() == expected
            assert client.get_all_flags() == proxy_flags(proxy)["flags"]
            assert client.is_enabled("enabled-flag") is True
            assert client.is_enabled("disabled-flag", True) is False
            # Whatever reasons the proxy sends parse as the SDK's enum (an unknown kind would
            # have failed the whole fetch).
            for key in expected:
                assert client.is_enabled_detail(key).reason.kind in set(EvaluationReasonKind)
            # The SDK keeps the proxy's ETag for its next conditional request.
            assert client._last_etag and client._last_etag.startswith('"'), client._last_etag
        finally:
            await client.close()

    asyncio.run(run())


def test_reasons_from_rollgate_reach_the_sdk(mock: Mock, proxy: Proxy) -> None:
    # Rollgate's /flags?withReasons=true says disabled-flag is OFF and the others FALLTHROUGH
    # (inRollout). Without reasons from the proxy the SDK synthesizes FALLTHROUGH{inRollout:value}
    # for every flag, so `is_enabled_detail` would report a disabled flag as a rollout miss.
    # A change pushed over the upstream stream (whose `init` carries flags only, like Rollgate's)
    # must not drop the reasons: whichever of the proxy's first fetch and the stream's first
    # snapshot lands last decides otherwise, so make the stream land last.
    before = proxy.get_json("/api/health")["revision"]
    mock.set_flag("max-items", False)
    wait_until(lambda: proxy.get_json("/api/health")["revision"] > before, 5.0, "the change to reach the proxy")
    upstream = mock_view(mock)["reasons"]
    assert upstream["disabled-flag"] == {"kind": "OFF"}

    async def run() -> None:
        client = make_client(proxy)
        try:
            await client.init()
            got = {key: client.is_enabled_detail(key).reason.to_dict() for key in upstream}
            assert got == upstream, f"proxy sent reasons {proxy_flags(proxy).get('reasons')}"
            assert client.is_enabled_detail("disabled-flag").reason.kind == EvaluationReasonKind.OFF
        finally:
            await client.close()

    asyncio.run(run())


def test_unknown_flags_take_the_callers_default(mock: Mock, proxy: Proxy) -> None:
    async def run() -> None:
        client = make_client(proxy)
        try:
            await client.init()
            assert client.is_enabled("missing-flag") is False
            assert client.is_enabled("missing-flag", True) is True
            assert client.is_enabled_detail("missing-flag").reason.kind == EvaluationReasonKind.UNKNOWN
        finally:
            await client.close()

    asyncio.run(run())
    # The proxy's own single-flag answer agrees (unknown = false, as isEnabled(key, false)).
    assert proxy.get_json("/api/flags/missing-flag") == {"key": "missing-flag", "enabled": False}
    assert "missing-flag" not in proxy_flags(proxy)["flags"]


def test_identify_gets_each_users_flags_as_the_proxy_evaluates_them(mock: Mock, proxy: Proxy) -> None:
    # A user with an explicit override upstream, plus users whose rollout-50 lands on both sides.
    mock.set_user_flags("u-beta", {"enabled-flag": False, "disabled-flag": True, "beta-only": True})
    users = ["u-beta", "user-1", "consistent-user-123", "user-2", "user-3", "user-4"]
    rollout_values = set()

    async def run() -> None:
        client = make_client(proxy)
        rec = Recorder()
        rec.attach(client)
        try:
            await client.init()
            anonymous = client.get_all_flags()
            for user in users:
                # identify() refetches /flags?user_id= carrying the *anonymous* ETag in
                # If-None-Match (the SDK keeps one ETag per client): the proxy must not answer 304.
                await client.identify(UserContext(id=user, email=f"{user}@example.com"))
                got = client.get_all_flags()
                assert got == proxy_flags(proxy, user)["flags"], user
                assert got == mock_view(mock, user)["flags"], user
                for key, value in got.items():
                    assert client.is_enabled(key, not value) is value, (user, key)
                if user != "u-beta":  # the override replaces the whole map upstream
                    rollout_values.add(got["rollout-50"])
            await client.identify(UserContext(id="u-beta"))
            assert client.is_enabled("beta-only") is True
            assert client.is_enabled("enabled-flag", True) is False
            await client.reset()
            assert client.get_all_flags() == anonymous
            assert client.is_enabled("beta-only") is False
            assert rec.errors == []
        finally:
            await client.close()

    asyncio.run(run())
    assert rollout_values == {True, False}, "pick users on both sides of rollout-50"


def test_streaming_change_at_rollgate_reaches_the_sdk(mock: Mock, proxy: Proxy) -> None:
    async def run() -> None:
        client, rec = await streaming_client(proxy, 10.0)
        try:
            for key, value in [("enabled-flag", False), ("enabled-flag", True), ("brand-new", True)]:
                mock.set_flag(key, value)
                # A generous bound, never a timing assertion; the time is printed as a figure.
                took = await rec.wait_change(key, value, 10.0)
                print(f"{key}={value} reached the SDK after {took:.3f} s")
                # Every stream event carried the full map: nothing was wiped.
                assert client.get_all_flags() == mock_view(mock)["flags"]
                rec.changed.clear()
            assert rec.errors == []
        finally:
            await client.close()

    asyncio.run(run())
    # The stream authenticated with the SDK's Bearer header and no `token` (the Python quirk).
    assert mock.stats()["streams_accepted"] == 1, "one upstream stream for the proxy, not per SDK"


def test_stream_stays_connected_for_30s(mock: Mock, proxy: Proxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rollgate")
    hold_s = 31.0

    async def run() -> None:
        client = make_client(proxy, streaming=True)
        rec = Recorder()
        rec.attach(client)
        try:
            await client.init()
            await wait_async(lambda: len(rec.flags_updated) >= 2, 5.0, "the stream's first snapshot")
            gauge_before = sdk_stream_gauge(proxy)
            await asyncio.sleep(hold_s)
            # Each (re)connect starts with a full `init` snapshot, which the SDK reports as
            # flags_updated: still exactly two means the one stream never dropped. A 5 s read
            # timeout without keepalive would have reconnected ~5 times by now.
            assert len(rec.flags_updated) == 2, f"stream reconnected: {len(rec.flags_updated) - 2} times"
            reconnects = [r.getMessage() for r in caplog.records if "SSE connection error" in r.getMessage()]
            assert reconnects == []
            if gauge_before is not None:
                assert sdk_stream_gauge(proxy) == gauge_before == 1
            # ... and it still delivers.
            mock.set_flag("enabled-flag", False)
            assert await rec.wait_change("enabled-flag", False, 2.0) < 2.0
            assert rec.errors == []
        finally:
            await client.close()

    asyncio.run(run())
    stats = mock.stats()
    assert stats["streams_accepted"] == 1 and stats["open_streams"] == 1, stats


def test_events_and_telemetry_flushes_are_accepted_and_forwarded(
    mock: Mock, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rollgate")

    async def run() -> None:
        client = make_client(proxy)
        try:
            await client.init()
            for i in range(3):
                client.track(
                    TrackEventOptions(
                        flag_key="enabled-flag",
                        event_name="checkout-completed",
                        user_id=f"user-{i}",
                        value=10.5 + i,
                        metadata={"n": i},
                    )
                )
            for _ in range(4):
                client.is_enabled("enabled-flag")
            client.is_enabled("disabled-flag")
            assert client._event_collector.buffer_size == 3
            assert client.get_telemetry_stats() == {"flagCount": 2, "evaluationCount": 5}
            await client.flush_events()
            await client.flush_telemetry()
            # Events are re-buffered on any status >= 400; telemetry on anything but exactly 200.
            assert client._event_collector.buffer_size == 0
            assert client.get_telemetry_stats() == {"flagCount": 0, "evaluationCount": 0}
        finally:
            await client.close()

    asyncio.run(run())
    assert [r.getMessage() for r in caplog.records if "flush" in r.getMessage().lower()] == []

    # The proxy batches and forwards upstream with the server key.
    def forwarded() -> Optional[dict[str, Any]]:
        got = mock.received()
        events = [e for body in got["events"] for e in body.get("events", [])]
        evals: dict[str, dict[str, int]] = {}
        for body in got["telemetry"]:
            for key, c in body.get("evaluations", {}).items():
                acc = evals.setdefault(key, {"total": 0, "true": 0, "false": 0})
                for k in acc:
                    acc[k] += c.get(k, 0)
        if len(events) >= 3 and evals.get("enabled-flag", {}).get("total", 0) >= 4:
            return {"events": events, "evals": evals}
        return None

    got = wait_until(forwarded, 10.0, "events and telemetry forwarded to the mock")
    names = sorted((e["eventName"], e["userId"], e["flagKey"]) for e in got["events"])
    assert names == [("checkout-completed", f"user-{i}", "enabled-flag") for i in range(3)]
    assert got["evals"]["enabled-flag"] == {"total": 4, "true": 4, "false": 0}
    assert got["evals"]["disabled-flag"] == {"total": 1, "true": 0, "false": 1}
    forwarded_requests = mock.requests("events") + mock.requests("telemetry")
    assert forwarded_requests
    for req in forwarded_requests:
        # Upstream sees the proxy's server key, never the SDK's key.
        assert dict(req["headers"]).get("authorization") == f"Bearer {MOCK_API_KEY}", req


def test_proxy_answers_the_sdks_post_routes_as_rollgate_does(mock: Mock, proxy: Proxy) -> None:
    # What the SDK's collectors (and the JS SDKs, which need a JSON body) get back.
    r = proxy.http.post(
        "/api/v1/sdk/events",
        json={"events": [{"flagKey": "a", "eventName": "e", "userId": "u", "timestamp": "2026-01-01T00:00:00+00:00"}]},
        headers={"Authorization": f"Bearer {SDK_KEY}"},
    )
    assert (r.status_code, r.json()) == (200, {"received": 1})
    r = proxy.http.post(
        "/api/v1/sdk/telemetry",
        json={"evaluations": {"a": {"total": 3, "true": 2, "false": 1}, "b": {"total": 2, "true": 0, "false": 2}}, "period_ms": 10},
        headers={"Authorization": f"Bearer {SDK_KEY}"},
    )
    assert (r.status_code, r.json()) == (200, {"received": 5})


def test_polling_uses_the_etag_and_picks_up_changes(mock: Mock, proxy: Proxy) -> None:
    async def run() -> None:
        client = make_client(proxy, refresh_interval_ms=200)
        rec = Recorder()
        rec.attach(client)
        try:
            await client.init()
            etag = client._last_etag
            await asyncio.sleep(1.0)  # ~5 polls, all conditional
            assert client._last_etag == etag, "nothing changed, so every poll was a 304"
            assert len(rec.flags_updated) == 1, "a 304 keeps the flags without an update"
            mock.set_flag("enabled-flag", False)
            assert await rec.wait_change("enabled-flag", False, 3.0) < 3.0
            assert client._last_etag != etag
            assert rec.errors == []
        finally:
            await client.close()

    asyncio.run(run())


CLIENT_KEY = "ck_clients_suite"


@pytest.mark.proxy_args("--client-keys", CLIENT_KEY)
def test_client_keys_the_sdk_key_is_the_proxys_client_key(mock: Mock, proxy: Proxy) -> None:
    async def run() -> None:
        good = make_client(proxy, streaming=True, api_key=CLIENT_KEY)
        rec = Recorder()
        rec.attach(good)
        bad = make_client(proxy, api_key="ck_wrong", retry=RetryConfig(max_retries=0))
        bad_rec = Recorder()
        bad_rec.attach(bad)
        try:
            await good.init()
            assert rec.errors == [] and good.is_enabled("enabled-flag") is True
            # The stream accepted the SDK's Bearer header (EventSource clients use ?token=).
            await wait_async(lambda: len(rec.flags_updated) >= 2, 5.0, "the stream's first snapshot")
            mock.set_flag("enabled-flag", False)
            assert await rec.wait_change("enabled-flag", False, 2.0) < 2.0

            await bad.init()  # never raises: reports the 401 and serves nothing
            assert bad.get_all_flags() == {}
            assert any(isinstance(e, AuthenticationError) for e in bad_rec.errors), bad_rec.errors
        finally:
            await good.close()
            await bad.close()

    asyncio.run(run())
    r = httpx.get(f"{proxy.url}/api/v1/sdk/flags")
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"


def test_a_large_flag_set_streams_gzip_coded_and_the_sdk_reads_it(mock: Mock, proxy: Proxy) -> None:
    """httpx asks for gzip, so a 400-flag set's stream comes gzip-coded (each frame compressed
    once by the proxy for every client); httpx decodes it as it arrives, and the SDK sees the
    whole map and then a change on the same stream."""
    many = {f"bulk-experiment-{i:04d}-checkout-flow": i % 2 == 0 for i in range(400)}
    mock.control("PUT", "flags", {"flags": many})
    wait_until(lambda: len(proxy_flags(proxy)["flags"]) == 400, 10.0, "the proxy serving the large set")
    with httpx.stream(
        "GET",
        f"{proxy.url}/api/v1/sdk/stream",
        headers={"Authorization": f"Bearer {SDK_KEY}"},
        timeout=10.0,
    ) as response:
        assert response.headers.get("content-encoding") == "gzip"

    async def run() -> None:
        client, rec = await streaming_client(proxy, 10.0)
        try:
            assert client.get_all_flags() == many
            last = "bulk-experiment-0399-checkout-flow"
            mock.set_flag(last, True)
            await rec.wait_change(last, True, 10.0)
            assert client.get_all_flags() == {**many, last: True}
            assert rec.errors == []
        finally:
            await client.close()

    asyncio.run(run())
