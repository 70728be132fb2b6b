"""Real processes for the SDK suite: the `mock-upstream` (Rollgate stand-in) and `rollgate-proxy`.

Both are the workspace's debug binaries (override with MOCK_UPSTREAM_BIN / ROLLGATE_PROXY_BIN).
Each prints `listening on http://127.0.0.1:PORT` as its first stdout line; everything they print
afterwards goes to a log file under test-artifacts/logs/ so a failure can be read afterwards.
Every wait here is bounded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = ROOT / "test-artifacts" / "logs"
MOCK_API_KEY = "test-api-key"
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S = 20.0


def binary(env_name: str, name: str) -> Path:
    path = Path(os.environ.get(env_name) or ROOT / "target" / "debug" / name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `cargo build -p rollgate-proxy-server -p rollgate-proxy-tests --bins`"
        )
    return path


class Process:
    """A child process whose first stdout line announces its URL."""

    def __init__(self, name: str, argv: list[str], env: Optional[dict[str, str]] = None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        self._log.write("$ " + " ".join(argv) + "\n")
        self._log.flush()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=full_env,
            text=True,
            bufsize=1,
        )
        self.url = self._await_url()
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _await_url(self) -> str:
        found: list[str] = []
        lines: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.append(line)
                self._log.write(line)
                self._log.flush()
                m = LISTENING.search(line)
                if m:
                    found.append(m.group(1))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not found:
            self.stop()
            raise RuntimeError(
                f"{self.name} did not print 'listening on http://127.0.0.1:PORT' within "
                f"{START_TIMEOUT_S}s; stdout={''.join(lines)!r}; log: {self.log_path}"
            )
        return found[0]

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._log.write(line)
                self._log.flush()
        except (ValueError, OSError):
            pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            self._log.close()
        except OSError:
            pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


class Mock:
    """The mock upstream, driven over its `/control/*` API."""

    def __init__(self, *extra_args: str):
        self.process = Process(
            "mock-upstream",
            [str(binary("MOCK_UPSTREAM_BIN", "mock-upstream")), "--port", "0", *extra_args],
        )
        self.url = self.process.url
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def control(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.http.request(method, "/control/" + path, json=body)
        if resp.status_code >= 400:
            raise AssertionError(f"mock {method} /control/{path}: {resp.status_code} {resp.text}")
        return resp.json() if resp.content else None

    def set_flag(self, key: str, value: Any) -> Any:
        return self.control("PUT", f"flags/{key}", {"value": value})

    def set_user_flags(self, user: str, flags: dict[str, Any]) -> Any:
        return self.control("PUT", f"users/{user}", {"flags": flags})

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "stats")

    def received(self) -> dict[str, Any]:
        return self.control("GET", "received")

    def requests(self, route: str) -> list[dict[str, Any]]:
        return self.control("GET", f"requests?route={route}")

    def stop(self) -> None:
        self.http.close()
        self.process.stop()


class Proxy:
    """rollgate-proxy in upstream mode against a [`Mock`]."""

    def __init__(self, mock: Mock, *extra_args: str, env: Optional[dict[str, str]] = None):
        full_env = {
            "ROLLGATE_API_KEY": MOCK_API_KEY,
            "ROLLGATE_BASE_URL": mock.url,
            "ROLLGATE_PROXY_LOG_LEVEL": "info",
        }
        full_env.update(env or {})
        self.process = Process(
            "rollgate-proxy",
            [
                str(binary("ROLLGATE_PROXY_BIN", "rollgate-proxy")),
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--snapshot-file",
                "",
                *extra_args,
            ],
            env=full_env,
        )
        self.url = self.process.url
        self.http = httpx.Client(base_url=self.url, timeout=10.0)
        wait_until(lambda: self.http.get("/ready").status_code == 200, 10.0, "proxy /ready")

    def get_json(self, path: str, **kwargs: Any) -> Any:
        resp = self.http.get(path, **kwargs)
        assert resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text}"
        return resp.json()

    def metrics(self) -> str:
        resp = self.http.get("/api/metrics")
        assert resp.status_code == 200, resp.text
        return resp.text

    def stop(self) -> None:
        self.http.close()
        self.process.stop()


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Polls `cond` until it returns a truthy value; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last_error = e
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_error!r})")


def metric(text: str, name: str, labels: str = "") -> Optional[float]:
    """The value of one Prometheus sample (`name{labels} value`), or None when absent."""
    target = name + (("{" + labels + "}") if labels else "")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) == 2 and parts[0] == target:
            return float(parts[1])
    return None


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
