"""The browser client (gateway/static/verify.js) and the demo page, checked without a browser.

verify.js runs under node in a vm context with fake window/document/fetch/EventSource, so
its state machine (exactly-once outcome, fallbacks, SSE → long-poll switch) is exercised
without Playwright.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "static"
VERIFY_JS = STATIC / "verify.js"
DEMO_HTML = STATIC / "demo.html"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


def node(*args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run([NODE, *args], capture_output=True, text=True, timeout=60)


def strip_js_comments(source: str) -> str:
    """Drop comments and blank lines, leaving strings, templates and regex literals alone."""
    out: list[str] = []
    i, n = 0, len(source)
    last_significant = ""
    while i < n:
        ch = source[i]
        nxt = source[i + 1] if i + 1 < n else ""
        if ch in "'\"`":
            j = i + 1
            while j < n and source[j] != ch:
                j += 2 if source[j] == "\\" else 1
            out.append(source[i : j + 1])
            i = j + 1
            last_significant = ch
        elif ch == "/" and nxt == "/":
            while i < n and source[i] != "\n":
                i += 1
        elif ch == "/" and nxt == "*":
            end = source.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif ch == "/" and (last_significant == "" or last_significant in "(,=:[!&|?{};+-*%<>~^"):
            # A regex literal: skip it whole so a `//` inside it is not taken for a comment.
            j, in_class = i + 1, False
            while j < n and (in_class or source[j] != "/"):
                if source[j] == "\\":
                    j += 1
                elif source[j] == "[":
                    in_class = True
                elif source[j] == "]":
                    in_class = False
                j += 1
            out.append(source[i : j + 1])
            i = j + 1
            last_significant = "/"
        else:
            out.append(ch)
            if not ch.isspace():
                last_significant = ch
            i += 1
    lines = (line.rstrip() for line in "".join(out).splitlines())
    return "\n".join(line for line in lines if line.strip()) + "\n"


def test_strip_js_comments_keeps_code() -> None:
    src = "const a = 'x // y'; // gone\n/* gone\n too */\n\nconst r = /\\/\\//g; const b = a / 2; // gone\n"
    assert strip_js_comments(src) == "const a = 'x // y';\nconst r = /\\/\\//g; const b = a / 2;\n"


@needs_node
def test_verify_js_is_valid_javascript() -> None:
    result = node("--check", str(VERIFY_JS))
    assert result.returncode == 0, result.stderr


def test_verify_js_is_small() -> None:
    stripped = strip_js_comments(VERIFY_JS.read_text(encoding="utf-8"))
    assert len(stripped.encode("utf-8")) < 8 * 1024


def test_verify_js_never_logs() -> None:
    # Phone numbers and session ids pass through this file; nothing of it may reach a console.
    assert "console." not in strip_js_comments(VERIFY_JS.read_text(encoding="utf-8"))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.body_state: str | None = None
        self.scripts: list[str | None] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "body":
            self.body_state = a.get("data-state")
        if tag == "script":
            self.scripts.append(a.get("src"))

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append(data)


def _demo_page() -> _Page:
    page = _Page()
    page.feed(DEMO_HTML.read_text(encoding="utf-8"))
    return page


def test_demo_page_has_the_stable_ids() -> None:
    page = _demo_page()
    expected = {
        "phone",
        "btn-truecaller",
        "btn-veriphone",
        "loader",
        "progress",
        "outcome",
        "outcome-status",
        "outcome-reason",
        "outcome-phone",
    }
    assert expected <= page.ids
    assert page.body_state == "idle"
    assert "/static/verify.js" in page.scripts


@needs_node
def test_demo_page_script_is_valid_javascript(tmp_path: Path) -> None:
    inline = _demo_page().inline
    assert inline, "the demo's own script was not found"
    script = tmp_path / "demo.js"
    script.write_text("\n".join(inline), encoding="utf-8")
    result = node("--check", str(script))
    assert result.returncode == 0, result.stderr


# --- behaviour, under node ------------------------------------------------------------

HARNESS = r"""
const fs = require('fs');
const vm = require('vm');
const SRC = fs.readFileSync(process.argv[2], 'utf8');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const json = (status, body) => new Response(JSON.stringify(body), {status});
const uncaught = [];
process.on('uncaughtException', (e) => uncaught.push(String(e && e.message)));

function env({focus = false, eventSource = true, popupBlocked = false, store = new Map(), route}) {
  const log = [];
  const sources = [];
  const requests = [];
  class FakeEventSource {
    constructor(url) {
      Object.assign(this, {url, readyState: 0, listeners: {}});
      sources.push(this);
      log.push(['es', url]);
    }
    addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
    emit(type, data) {
      if (this.readyState !== 2) this.readyState = 1;
      for (const fn of this.listeners[type] || []) fn({data: JSON.stringify(data)});
    }
    fail(state) { this.readyState = state; if (this.onerror) this.onerror({}); }
    close() { this.readyState = 2; log.push(['es.close']); }
  }
  const popups = [];
  const win = {
    location: { set href(v) { log.push(['navigate', v]); }, assign(v) { log.push(['assign', v]); } },
    open(url, name) {
      log.push(['open', url, name]);
      if (popupBlocked) return null;
      const p = {closed: false, opener: win, location: {}, close() { this.closed = true; log.push(['popup.close']); }};
      popups.push(p);
      return p;
    },
  };
  const fetch = (url, init = {}) => {
    const body = init.body ? JSON.parse(init.body) : null;
    requests.push({url, method: init.method || 'GET', headers: init.headers || {}, body});
    log.push(['fetch', init.method || 'GET', url]);
    const answer = route(url, init, requests.length);
    if (answer) return Promise.resolve(answer);
    // Unanswered: hangs until aborted, like a held long poll.
    return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))));
  };
  const ctx = vm.createContext({
    window: win, document: {hasFocus: () => focus}, fetch, AbortController, setTimeout, clearTimeout,
    EventSource: eventSource ? FakeEventSource : undefined,
    sessionStorage: {
      getItem: (k) => store.get(k) ?? null,
      setItem: (k, v) => store.set(k, String(v)),
      removeItem: (k) => store.delete(k),
    },
  });
  vm.runInContext(SRC, ctx);
  const calls = [];
  const callbacks = {
    onProgress: (s) => calls.push(['progress', s]),
    onOutcome: (o) => calls.push(['outcome', o.status]),
    onFallback: (r) => calls.push(['fallback', r]),
    onError: (e) => calls.push(['error', e.code, e.status, e.message]),
  };
  return {GV: win.GatewayVerify, log, sources, requests, popups, calls, callbacks, store};
}

const created = (provider) => json(201, Object.assign({
  id: 'sess1', provider, status: 'pending',
  stream_url: '/v1/sessions/sess1/events', status_url: '/v1/sessions/sess1',
}, provider === 'truecaller'
  ? {truecaller: {request_nonce: 'nonce1234', deeplink: 'truecallersdk://truesdk/web_verify?requestNonce=nonce1234'}}
  : {veriphone: {session_uuid: 'uuid1', redirect_url: 'https://veriph.example/flow'}}));
const snap = (status, outcome = null) => ({id: 'sess1', status, outcome});
const outcome = (status) =>
  ({status, reason: status === 'verified' ? null : status, provider: 'truecaller', phone: '+15551234567'});

const scenarios = {
  async truecaller_app_present() {
    const t = env({focus: false, route: (url) => url.endsWith('/v1/sessions') ? created('truecaller') : null});
    const handle = await t.GV.start({
      ...t.callbacks, provider: 'truecaller', phone: '+15551234567', userRef: 'u1', gatewayUrl: 'https://gw.test/',
    });
    const beforeCheck = t.sources.length;
    await sleep(700);
    const es = t.sources[0];
    es.emit('status', snap('pending'));
    es.emit('progress', {stage: 'flow_invoked'});
    es.emit('outcome', outcome('verified'));
    const closedAfterOutcome = es.readyState;
    es.emit('outcome', outcome('verified'));
    const request = t.requests[0];
    return {sessionId: handle.sessionId, beforeCheck, closedAfterOutcome, calls: t.calls, log: t.log, request};
  },
  async truecaller_no_app() {
    const t = env({focus: true, route: () => created('truecaller')});
    await t.GV.start({...t.callbacks, provider: 'truecaller'});
    await sleep(700);
    return {calls: t.calls, sources: t.sources.length, body: t.requests[0].body};
  },
  async expired_snapshot_custom_opener() {
    const t = env({focus: true, route: () => created('truecaller')});
    const opened = [];
    const openDeeplink = (d) => opened.push(d);
    await t.GV.start({...t.callbacks, provider: 'truecaller', skipFocusCheck: true, openDeeplink});
    t.sources[0].emit('status', snap('expired', outcome('expired')));
    t.sources[0].emit('outcome', outcome('expired'));
    return {calls: t.calls, opened, log: t.log};
  },
  async create_error() {
    const t = env({route: () => json(409, {error: {code: 'provider_disabled', message: 'Truecaller is disabled'}})});
    const handle = await t.GV.start({...t.callbacks, provider: 'truecaller'});
    return {calls: t.calls, sessionId: handle.sessionId};
  },
  async polling_without_eventsource() {
    const t = env({eventSource: false, route: (url, init, n) => n === 1 ? created('truecaller')
      : n === 2 ? json(200, snap('pending')) : json(200, snap('rejected', outcome('rejected')))});
    await t.GV.start({...t.callbacks, provider: 'truecaller', skipFocusCheck: true, pollInterval: 5});
    await sleep(100);
    return {calls: t.calls, urls: t.requests.map((r) => r.url)};
  },
  async stream_errors_switch_to_polling() {
    const t = env({route: (url, init, n) =>
      n === 1 ? created('truecaller') : json(200, snap('verified', outcome('verified')))});
    await t.GV.start({...t.callbacks, provider: 'truecaller', skipFocusCheck: true, pollInterval: 5});
    const es = t.sources[0];
    es.fail(0); es.fail(0);
    const requestsAfterTwo = t.requests.length;
    es.fail(0);
    await sleep(50);
    es.emit('outcome', outcome('verified'));
    return {calls: t.calls, requestsAfterTwo, urls: t.requests.map((r) => r.url), esState: es.readyState};
  },
  async poll_404_is_an_error() {
    const t = env({eventSource: false, route: (url, init, n) =>
      n === 1 ? created('truecaller') : json(404, {error: {code: 'session_not_found', message: 'No such session'}})});
    await t.GV.start({...t.callbacks, provider: 'truecaller', skipFocusCheck: true, pollInterval: 5});
    await sleep(50);
    return {calls: t.calls};
  },
  async veriphone_popup() {
    const t = env({route: () => created('veriphone')});
    const ready = t.GV.start({...t.callbacks, provider: 'veriphone'});
    const openedSynchronously = t.log.some((e) => e[0] === 'open');
    await ready;
    const popup = t.popups[0];
    const href = popup.location.href;
    t.sources[0].emit('outcome', outcome('verified'));
    return {openedSynchronously, href, opener: popup.opener, closed: popup.closed, calls: t.calls};
  },
  async veriphone_blocked_then_resume() {
    const store = new Map();
    const t = env({popupBlocked: true, store, route: () => created('veriphone')});
    await t.GV.start({...t.callbacks, provider: 'veriphone'});
    const stored = JSON.parse(store.get('gatewayVerify.pending'));
    // The flow comes back to a fresh page in the same tab.
    const back = env({store, route: () => null});
    const handle = await back.GV.resume(back.callbacks);
    back.sources[0].emit('status', snap('verified', outcome('verified')));
    const again = back.GV.resume(back.callbacks);
    return {assigned: t.log.filter((e) => e[0] === 'assign'), stored, sessionId: handle.sessionId,
            calls: back.calls, left: store.size, again};
  },
  async cancel_before_created() {
    const t = env({route: () => null});
    const ready = t.GV.start({...t.callbacks, provider: 'veriphone'});
    ready.cancel();
    const handle = await ready;
    return {calls: t.calls, popupClosed: t.popups[0].closed, sessionId: handle.sessionId};
  },
  async throwing_callback_keeps_exactly_once() {
    const t = env({route: () => created('truecaller')});
    let count = 0;
    const onOutcome = () => { count++; throw new Error('page bug'); };
    await t.GV.start({provider: 'truecaller', skipFocusCheck: true, openDeeplink() {}, onOutcome});
    t.sources[0].emit('outcome', outcome('verified'));
    t.sources[0].emit('outcome', outcome('verified'));
    await sleep(10);
    return {count, esState: t.sources[0].readyState, uncaught: uncaught.splice(0)};
  },
};

(async () => {
  const results = {};
  for (const [name, fn] of Object.entries(scenarios)) {
    try { results[name] = await fn(); } catch (e) { results[name] = {crash: String(e && e.stack)}; }
  }
  process.stdout.write(JSON.stringify(results));
  process.exit(0);
})();
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if NODE is None:
        pytest.skip("node is not installed")
    harness = tmp_path_factory.mktemp("js") / "harness.js"
    harness.write_text(HARNESS, encoding="utf-8")
    result = node(str(harness), str(VERIFY_JS))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    crashed = {name: r["crash"] for name, r in data.items() if "crash" in r}
    assert not crashed, crashed
    return data


def test_truecaller_fires_deeplink_then_streams_after_focus_check(runs: dict[str, Any]) -> None:
    r = runs["truecaller_app_present"]
    assert r["sessionId"] == "sess1"
    assert r["request"]["url"] == "https://gw.test/v1/sessions"
    assert r["request"]["method"] == "POST"
    assert r["request"]["headers"]["Content-Type"] == "application/json"
    assert r["request"]["body"] == {"provider": "truecaller", "phone": "+15551234567", "user_ref": "u1"}
    assert ["navigate", "truecallersdk://truesdk/web_verify?requestNonce=nonce1234"] in r["log"]
    assert r["beforeCheck"] == 0, "the stream must wait for the ~600 ms focus check"
    assert ["es", "https://gw.test/v1/sessions/sess1/events"] in r["log"]
    assert r["closedAfterOutcome"] == 2, "EventSource must be closed as soon as the outcome arrives"
    assert r["calls"] == [["progress", "flow_invoked"], ["outcome", "verified"]]


def test_truecaller_still_focused_means_no_app(runs: dict[str, Any]) -> None:
    r = runs["truecaller_no_app"]
    assert r["calls"] == [["fallback", "no_app"]]
    assert r["sources"] == 0
    assert r["body"] == {"provider": "truecaller"}


def test_expired_outcome_then_fallback_once(runs: dict[str, Any]) -> None:
    r = runs["expired_snapshot_custom_opener"]
    assert r["opened"] == ["truecallersdk://truesdk/web_verify?requestNonce=nonce1234"]
    assert not any(e[0] == "navigate" for e in r["log"])
    assert r["calls"] == [["outcome", "expired"], ["fallback", "expired"]]


def test_create_error_reaches_on_error(runs: dict[str, Any]) -> None:
    r = runs["create_error"]
    assert r["calls"] == [["error", "provider_disabled", 409, "Truecaller is disabled"]]
    assert r["sessionId"] is None


def test_long_polls_without_eventsource(runs: dict[str, Any]) -> None:
    r = runs["polling_without_eventsource"]
    assert r["calls"] == [["outcome", "rejected"]]
    assert r["urls"][1:] == ["/v1/sessions/sess1?wait=25"] * 2


def test_repeated_stream_errors_switch_to_polling(runs: dict[str, Any]) -> None:
    r = runs["stream_errors_switch_to_polling"]
    assert r["requestsAfterTwo"] == 1, "two errors are EventSource's normal reconnects"
    assert r["urls"][1] == "/v1/sessions/sess1?wait=25"
    assert r["esState"] == 2
    assert r["calls"] == [["outcome", "verified"]]


def test_poll_404_reports_error(runs: dict[str, Any]) -> None:
    assert runs["poll_404_is_an_error"]["calls"] == [["error", "session_not_found", 404, "No such session"]]


def test_veriphone_popup_opened_during_click(runs: dict[str, Any]) -> None:
    r = runs["veriphone_popup"]
    assert r["openedSynchronously"], "window.open must run inside the click, before any await"
    assert r["href"] == "https://veriph.example/flow"
    assert r["opener"] is None
    assert r["closed"] is True
    assert r["calls"] == [["outcome", "verified"]]


def test_veriphone_blocked_popup_navigates_and_resumes(runs: dict[str, Any]) -> None:
    r = runs["veriphone_blocked_then_resume"]
    assert r["assigned"] == [["assign", "https://veriph.example/flow"]]
    assert r["stored"]["id"] == "sess1"
    assert r["sessionId"] == "sess1"
    assert r["calls"] == [["outcome", "verified"]]
    assert r["left"] == 0 and r["again"] is None


def test_cancel_is_silent(runs: dict[str, Any]) -> None:
    r = runs["cancel_before_created"]
    assert r["calls"] == []
    assert r["popupClosed"] is True
    assert r["sessionId"] is None


def test_throwing_callback_does_not_repeat_the_outcome(runs: dict[str, Any]) -> None:
    r = runs["throwing_callback_keeps_exactly_once"]
    assert r["count"] == 1
    assert r["esState"] == 2
    assert r["uncaught"] == ["page bug"]
