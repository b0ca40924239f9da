"""`gateway doctor URL`: from the operator's machine, check that the proxy in front keeps streams working.

One line per check (`ok`, `FAIL` or `skip`, and why); exit 1 when a check failed. It creates
throw-away Truecaller sessions through the public URL and ends one with a `user_rejected`
callback, as Truecaller's server would; nothing personal is sent or printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

# A first event slower than this through the proxy (and this much slower than direct) means
# the proxy holds the stream back.
BUFFERED_AFTER = 1.0
PROBE_ORIGIN = "https://gateway-doctor.invalid"


@dataclass
class Check:
    name: str
    result: str  # ok | FAIL | skip
    detail: str

    def line(self) -> str:
        return f"{self.result:<4}  {self.name}: {self.detail}"


async def _first_event(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> tuple[float, httpx.Response | None, bytes]:
    """Seconds to the end of the first SSE event, the response (None: no answer in time), the bytes read."""
    started = time.monotonic()
    seen = b""
    try:
        async with client.stream("GET", path, headers=headers) as response:
            if response.status_code == 200:
                async for chunk in response.aiter_raw():
                    seen += chunk
                    if b"\n\n" in seen:
                        break
            return time.monotonic() - started, response, seen
    except httpx.TimeoutException:
        return time.monotonic() - started, None, seen


async def _session(client: httpx.AsyncClient) -> dict[str, object] | str:
    answer = await client.post("/v1/sessions", json={"provider": "truecaller"})
    if answer.status_code != 201:
        code = (
            answer.json().get("error", {}).get("code")
            if answer.headers.get("content-type", "").startswith("application/json")
            else None
        )
        return f"POST /v1/sessions answered {answer.status_code} {code or ''}".strip()
    return dict(answer.json())


async def run_checks(
    url: str, *, direct: str | None, origins: Sequence[str], heartbeat: float, timeout: float
) -> list[Check]:
    checks: list[Check] = []
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, trust_env=False) as client:
        session = await _session(client)
        if isinstance(session, str):
            return [Check("session", "FAIL", session + "; the stream checks need a Truecaller session")]
        stream = str(session["stream_url"])

        took, response, seen = await _first_event(client, stream, {})
        if response is None:
            checks.append(Check("headers", "FAIL", f"no answer head within {timeout:g} s: the proxy holds the stream"))
            checks.append(
                Check("buffering", "FAIL", f"no first event within {timeout:g} s (nginx: proxy_buffering off)")
            )
            return checks
        kind = response.headers.get("content-type", "")
        problems = []
        if not kind.startswith("text/event-stream"):
            problems.append(f"Content-Type {kind or 'missing'}")
        if response.headers.get("cache-control") != "no-store":
            problems.append(f"Cache-Control {response.headers.get('cache-control') or 'missing'}")
        if response.headers.get("content-encoding"):
            problems.append(f"Content-Encoding {response.headers['content-encoding']} (compression holds events back)")
        checks.append(
            Check(
                "headers", "FAIL" if problems else "ok", "; ".join(problems) or "event-stream, no-store, not compressed"
            )
        )

        baseline = None
        if direct:
            async with httpx.AsyncClient(base_url=direct.rstrip("/"), timeout=timeout, trust_env=False) as near:
                baseline, _, _ = await _first_event(near, stream, {})
        slow = took > BUFFERED_AFTER and (baseline is None or took - baseline > BUFFERED_AFTER)
        versus = f" (direct {baseline * 1000:.0f} ms)" if baseline is not None else ""
        checks.append(
            Check(
                "buffering",
                "FAIL" if slow or b"event: status" not in seen else "ok",
                f"first event after {took * 1000:.0f} ms{versus}"
                + ("; the proxy buffers the stream (nginx: proxy_buffering off)" if slow else ""),
            )
        )

        checks.append(await _last_event_id(client, session))
        checks.append(await _idle(client, heartbeat, timeout))
        checks += await _cors(client, stream, origins)
    return checks


async def _last_event_id(client: httpx.AsyncClient, session: dict[str, object]) -> Check:
    """End the session as Truecaller would (`user_rejected`), then reconnect with the outcome's id: 204."""
    nonce = dict(session["truecaller"])["request_nonce"]  # type: ignore[call-overload]
    done = await client.post("/v1/callbacks/truecaller", json={"requestId": nonce, "status": "user_rejected"})
    if done.status_code != 200:
        return Check("Last-Event-ID", "skip", f"could not end the test session (callback answered {done.status_code})")
    _, _, seen = await _first_event(client, str(session["stream_url"]), {})
    event_id = next((line[4:].strip() for line in seen.decode().splitlines() if line.startswith("id: ")), None)
    if event_id is None:
        return Check("Last-Event-ID", "FAIL", "the stream of an ended session sent no outcome id")
    again = await client.get(str(session["stream_url"]), headers={"Last-Event-ID": event_id})
    if again.status_code == 204:
        return Check("Last-Event-ID", "ok", "reaches the gateway (a reconnect after the outcome gets 204)")
    return Check(
        "Last-Event-ID", "FAIL", f"a reconnect after the outcome got {again.status_code}: the proxy drops the header"
    )


async def _idle(client: httpx.AsyncClient, heartbeat: float, timeout: float) -> Check:
    """A stream stays open past a heartbeat, and the heartbeat arrives."""
    wait = heartbeat + 2.0
    if wait > timeout:
        return Check(
            "idle timeout", "skip", f"stream.heartbeat is {heartbeat:g} s; run with --timeout {wait:g} or more"
        )
    session = await _session(client)
    if isinstance(session, str):
        return Check("idle timeout", "skip", session)
    started = time.monotonic()
    try:
        async with asyncio.timeout(wait), client.stream("GET", str(session["stream_url"])) as response:
            seen = b""
            async for chunk in response.aiter_raw():
                seen += chunk
                # A heartbeat is a comment block (":") after the first event.
                if any(block.startswith(b":") for block in seen.split(b"\n\n")[1:]):
                    return Check("idle timeout", "ok", f"a heartbeat came after {time.monotonic() - started:.1f} s")
    except TimeoutError:
        return Check("idle timeout", "FAIL", f"no heartbeat within {wait:g} s (stream.heartbeat {heartbeat:g} s)")
    except httpx.HTTPError as exc:
        return Check(
            "idle timeout", "FAIL", f"the stream broke after {time.monotonic() - started:.1f} s ({type(exc).__name__})"
        )
    return Check(
        "idle timeout",
        "FAIL",
        f"the proxy ended the idle stream after {time.monotonic() - started:.1f} s, before a heartbeat",
    )


async def _cors(client: httpx.AsyncClient, stream: str, origins: Sequence[str]) -> list[Check]:
    if not origins:
        return [Check("CORS", "skip", "no origins (server.cors_allow_origins in --config, or --origin)")]
    checks = []
    for origin in [*origins, PROBE_ORIGIN]:
        allowed = origin != PROBE_ORIGIN
        preflight = await client.options(
            "/v1/sessions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        _, response, _ = await _first_event(client, stream, {"Origin": origin})
        on_stream = response.headers.get("access-control-allow-origin") if response is not None else None
        got = {preflight.headers.get("access-control-allow-origin"), on_stream}
        ok = got == {origin} if allowed else got == {None}
        want = "allowed on the preflight and the stream" if allowed else "refused (not configured)"
        checks.append(
            Check(
                f"CORS {origin}",
                "ok" if ok else "FAIL",
                want if ok else f"expected {want}, got {sorted(map(str, got))}",
            )
        )
    return checks


def doctor(url: str, *, direct: str | None, origins: Sequence[str], heartbeat: float, timeout: float) -> int:
    try:
        checks = asyncio.run(run_checks(url, direct=direct, origins=origins, heartbeat=heartbeat, timeout=timeout))
    except httpx.HTTPError as exc:
        print(f"FAIL  reach: {url}: {type(exc).__name__}: {exc}")
        return 1
    for check in checks:
        print(check.line())
    return 1 if any(c.result == "FAIL" for c in checks) else 0
