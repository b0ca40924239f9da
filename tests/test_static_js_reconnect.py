"""verify.js's calm reconnects under node, on a fake clock: its own retries back off
(exponential, capped, jittered), one stream per session per tab, and a page that wakes up
(bfcache restore, a resumed tab, the network back) reopens a closed stream or ends a pending
back-off early, once, after a random pause.

Like tests/test_static_js.py, verify.js runs in a vm context with fake window, document,
fetch and EventSource; here setTimeout, Math.random and Date.now are fakes too, so every
delay verify.js asks for is recorded exactly and no test waits for one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_static_js import NODE, VERIFY_JS, node

HARNESS = r"""
const fs = require('fs');
const vm = require('vm');
const SRC = fs.readFileSync(process.argv[2], 'utf8');
const flush = () => new Promise((r) => setImmediate(r));
const json = (status, body) => new Response(JSON.stringify(body), {status});
const SAVED = {id: 'sess1', stream_url: '/v1/sessions/sess1/events', status_url: '/v1/sessions/sess1', base: ''};
const snap = (status) => ({id: 'sess1', status, outcome: status === 'pending' ? null : {status, reason: null}});

// One page: verify.js on a fake clock. `route(url, n)` answers fetches: a Response, 'fail'
// (a network error), or nothing (held until aborted, like a long poll).
function page({random = () => 0.5, route = () => 'fail'} = {}) {
  let now = 0;
  let seq = 0;
  const timers = new Map();
  const asked = []; // every delay verify.js asked setTimeout for, in order
  const setT = (fn, ms = 0, ...args) => {
    timers.set(++seq, {at: now + Math.max(0, ms), fn, args});
    asked.push(ms);
    return seq;
  };
  const clearT = (id) => { timers.delete(id); };
  // Run the earliest timer (advancing the clock to it); null when none is left.
  async function tick() {
    await flush();
    if (!timers.size) return null;
    const [id, t] = [...timers.entries()].sort((a, b) => a[1].at - b[1].at || a[0] - b[0])[0];
    timers.delete(id);
    now = Math.max(now, t.at);
    t.fn(...t.args);
    await flush();
    await flush();
    return t;
  }
  const listeners = {window: {}, document: {}};
  const target = (name) => ({
    addEventListener(type, fn) { (listeners[name][type] ||= new Set()).add(fn); },
    removeEventListener(type, fn) { if (listeners[name][type]) listeners[name][type].delete(fn); },
  });
  const fire = (name, type, extra = {}) => {
    for (const fn of [...(listeners[name][type] || [])]) fn({type, ...extra});
  };
  const sources = [];
  class FakeEventSource {
    constructor(url) { Object.assign(this, {url, readyState: 0, listeners: {}, closed: 0}); sources.push(this); }
    addEventListener(type, fn) { (this.listeners[type] ||= []).push(fn); }
    emit(type, data) {
      this.readyState = 1;
      for (const fn of this.listeners[type] || []) fn({data: JSON.stringify(data)});
    }
    fail(state) { this.readyState = state; if (this.onerror) this.onerror({}); }
    close() { this.readyState = 2; this.closed++; }
  }
  const requests = [];
  const fetch = (url, init = {}) => {
    requests.push({url, at: now});
    const answer = route(url, requests.length);
    if (answer === 'fail') return Promise.reject(new TypeError('Failed to fetch'));
    if (answer) return Promise.resolve(answer);
    return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))));
  };
  const store = new Map([['gatewayVerify.pending', JSON.stringify(SAVED)]]);
  const doc = {...target('document'), hasFocus: () => false, visibilityState: 'visible'};
  const ctx = vm.createContext({
    window: {...target('window'), location: {}}, document: doc, fetch, AbortController,
    setTimeout: setT, clearTimeout: clearT, EventSource: FakeEventSource, __random: random, __now: () => now,
    sessionStorage: {
      getItem: (k) => store.get(k) ?? null,
      setItem: (k, v) => store.set(k, String(v)),
      removeItem: (k) => store.delete(k),
    },
  });
  vm.runInContext('Math.random = () => __random(); Date.now = () => __now();', ctx);
  vm.runInContext(SRC, ctx);
  const calls = [];
  const callbacks = {
    onOutcome: (o) => calls.push(['outcome', o.status]),
    onFallback: (r) => calls.push(['fallback', r]),
    onError: (e) => calls.push(['error', e.code]),
  };
  return {GV: ctx.window.GatewayVerify, tick, fire, doc, sources, requests, calls, callbacks, asked,
          now: () => now, timers};
}

// The stream is given up (the browser closed it after an HTTP error); every poll fails.
async function fallbackDelays(random) {
  const p = page({random});
  await p.GV.resume({...p.callbacks, pollInterval: 3000});
  p.sources[0].emit('status', snap('pending'));
  const before = p.asked.length;
  p.sources[0].fail(2);
  const requestsRightAfter = p.requests.length;
  const waits = [];
  while (p.calls.length === 0) {
    const t = await p.tick();
    if (t === null) break;
  }
  // The waits before each poll, and when each poll was made.
  return {waits: p.asked.slice(before), polls: p.requests.map((r) => r.at), requestsRightAfter, calls: p.calls};
}

const scenarios = {
  async backoff_low() { return fallbackDelays(() => 0); },
  async backoff_high() { return fallbackDelays(() => 0.999999); },
  async many_pages_spread() {
    // 50 pages lose their stream in the same instant: when does each poll first?
    const firsts = [];
    for (let i = 0; i < 50; i++) {
      const p = page({random: Math.random, route: () => null});
      await p.GV.resume({...p.callbacks, pollInterval: 3000});
      p.sources[0].fail(2);
      while (p.requests.length === 0 && (await p.tick()) !== null);
      firsts.push(p.requests[0].at);
    }
    return {firsts};
  },
  async second_resume_opens_nothing() {
    const p = page({route: () => null});
    const a = p.GV.resume(p.callbacks);
    const b = p.GV.resume(p.callbacks);
    p.sources[0].emit('status', snap('pending'));
    const c = p.GV.resume(p.callbacks);
    p.sources[0].emit('outcome', {status: 'verified', reason: null});
    return {same: a === b && b === c, sources: p.sources.length, calls: p.calls, after: p.GV.resume(p.callbacks)};
  },
  async wake_reopens_a_closed_stream_once() {
    const p = page({random: () => 0.25, route: () => null});
    await p.GV.resume(p.callbacks);
    p.sources[0].emit('status', snap('pending'));
    const ignored = [];
    // A live stream reconnects by itself: a wake-up leaves it alone.
    p.fire('window', 'online');
    ignored.push(p.sources.length);
    // The browser closed the stream for good while the page slept (no error event).
    p.sources[0].readyState = 2;
    p.fire('window', 'pageshow', {persisted: false}); // a fresh load, not a restore
    p.doc.visibilityState = 'hidden';
    p.fire('document', 'visibilitychange'); // still hidden
    ignored.push(p.timers.size);
    p.doc.visibilityState = 'visible';
    const before = p.asked.length;
    p.fire('window', 'pageshow', {persisted: true});
    p.fire('document', 'visibilitychange');
    p.fire('document', 'resume');
    p.fire('window', 'online');
    const reopenAfter = p.asked.slice(before);
    const beforeTick = p.sources.length;
    const t0 = p.now();
    while (p.sources.length === 1 && (await p.tick()) !== null);
    const reopenedAt = p.now() - t0;
    p.sources[1].emit('status', snap('rejected'));
    p.fire('window', 'online'); // after the outcome: nothing listens any more
    return {ignored, reopenAfter, beforeTick, reopenedAt, sources: p.sources.map((s) => [s.url, s.readyState]),
            calls: p.calls, pending: p.timers.size};
  },
  async wake_ends_a_backoff_early_once() {
    let answer = 'fail';
    const p = page({random: () => 0.5, route: () => answer});
    await p.GV.resume({...p.callbacks, pollInterval: 10000});
    p.sources[0].fail(2);
    await p.tick(); // the first poll, 7.5 s later; it fails
    await p.tick(); // the second, 15 s later; it fails, and the next would wait 22.5 s
    const polled = p.requests.length;
    answer = json(200, snap('verified'));
    const t0 = p.now();
    p.fire('window', 'online');
    p.fire('document', 'visibilitychange');
    while (p.calls.length === 0 && (await p.tick()) !== null);
    return {polled, waits: p.asked, after: p.now() - t0, requests: p.requests.length, calls: p.calls,
            pending: p.timers.size};
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

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if NODE is None:
        pytest.skip("node is not installed")
    harness = tmp_path_factory.mktemp("js") / "reconnect.js"
    harness.write_text(HARNESS, encoding="utf-8")
    result = node(str(harness), str(VERIFY_JS))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    crashed = {name: r["crash"] for name, r in data.items() if "crash" in r}
    assert not crashed, crashed
    return data


def test_a_given_up_stream_polls_after_a_backoff_that_doubles_up_to_a_cap(runs: dict[str, Any]) -> None:
    low, high = runs["backoff_low"], runs["backoff_high"]
    for r in (low, high):
        assert r["requestsRightAfter"] == 0, "falling back to polling must not poll in the same instant"
        assert r["calls"] == [["error", "network_error"]]
        assert len(r["polls"]) == 5  # then onError
    # pollInterval × 2^n, at most 30 s, times a random factor in [0.5, 1).
    assert low["waits"] == [1500, 3000, 6000, 12000, 15000]
    assert [round(w) for w in high["waits"]] == [3000, 6000, 12000, 24000, 30000]
    assert low["polls"] == [1500, 4500, 10500, 22500, 37500]


def test_pages_that_lose_the_stream_together_do_not_poll_together(runs: dict[str, Any]) -> None:
    firsts = runs["many_pages_spread"]["firsts"]
    assert all(1500 <= t < 3000 for t in firsts)
    assert max(firsts) - min(firsts) > 750  # half the window at least, for 50 uniform draws
    assert len({round(t / 100) for t in firsts}) >= 8  # not one 100 ms bucket


def test_a_second_resume_of_the_same_session_opens_no_second_stream(runs: dict[str, Any]) -> None:
    r = runs["second_resume_opens_nothing"]
    assert r["same"] is True
    assert r["sources"] == 1
    assert r["calls"] == [["outcome", "verified"]]
    assert r["after"] is None  # finished: nothing left to resume


def test_a_wake_up_reopens_a_stream_closed_meanwhile_once_after_a_random_pause(runs: dict[str, Any]) -> None:
    r = runs["wake_reopens_a_closed_stream_once"]
    # A live stream, a non-persisted pageshow and a hidden page: no reopen is scheduled.
    assert r["ignored"] == [1, 0]
    # Four wake-up events, one reopen, 1000 ms × random (0.25) later.
    assert r["reopenAfter"] == [250]
    assert r["beforeTick"] == 1 and r["reopenedAt"] == 250
    assert r["sources"] == [["/v1/sessions/sess1/events", 2], ["/v1/sessions/sess1/events", 2]]
    assert r["calls"] == [["outcome", "rejected"]]
    assert r["pending"] == 0


def test_a_wake_up_ends_a_pending_backoff_early_once(runs: dict[str, Any]) -> None:
    r = runs["wake_ends_a_backoff_early_once"]
    assert r["polled"] == 2
    # 10 s × 0.75, then 20 s × 0.75, then the 30 s cap × 0.75 pending when the network came back.
    assert r["waits"][-4:-1] == [7500, 15000, 22500]
    assert r["waits"][-1] == 500  # the wake-up: the next poll 1000 ms × random (0.5) from now
    assert r["after"] == 500
    assert r["requests"] == 3  # one poll for two wake-up events
    assert r["calls"] == [["outcome", "verified"]]
    assert r["pending"] == 0
