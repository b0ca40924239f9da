/*
 * GatewayVerify: browser client for the phone-verification gateway.
 * Plain JavaScript, no build step, no dependency. See demo.html for a complete page.
 *
 *   const handle = await GatewayVerify.start({provider: 'truecaller', onOutcome, onFallback});
 *   // onFallback(reason): 'no_app', or after the outcome 'expired' / 'use_another_number'.
 *   handle.cancel();
 *
 * start() must be called from the user's click handler: both the Truecaller deep link and
 * the Veriph.One popup need the browser's "user activation" or they are blocked.
 *
 * Reconnects stay calm, so a gateway restart does not bring every page back at once:
 * - EventSource reconnects by itself after the `retry:` the gateway sent (jittered per stream
 *   when the gateway sets stream.retry_jitter).
 * - verify.js's own retries back off: a stream it gives up (the browser closed it after an
 *   HTTP error, MAX_STREAM_ERRORS errors in a row, or no first event) turns into long polling
 *   only after pollInterval × [0.5, 1) ms, and each failed poll doubles that wait (random
 *   factor kept, at most 30 s; after MAX_POLL_FAILURES, onError).
 * - A tab holds at most one stream per session: a second resume() of the same session
 *   returns the running verification (its handle Promise) and opens nothing.
 * - When the page wakes up (back from the back/forward cache: `pageshow` with persisted;
 *   resumed by a mobile browser: `visibilitychange` to visible, `resume`; the network back:
 *   `online`), a stream the browser closed meanwhile is opened again, once, and a retry
 *   waiting out its back-off is made now, both after a random pause under a second. The
 *   gateway answers the new stream with the current status, and the outcome at once if it
 *   came meanwhile.
 */
(() => {
  'use strict';

  // Truecaller's documented check: if the page still has focus this long after firing the
  // deep link, no app took over the screen (no app, or an in-app browser that ignored it).
  const FOCUS_CHECK_MS = 600;
  // EventSource retries forever on its own; a proxy that buffers or strips text/event-stream
  // shows up as repeated errors without a single event, so give up on SSE after a few.
  const MAX_STREAM_ERRORS = 3;
  // The server sends a `status` event as soon as a stream connects; if it has not arrived
  // by then, something between us and the gateway is holding the stream back.
  const FIRST_EVENT_MS = 10000;
  const LONG_POLL_WAIT = 25;
  const MAX_POLL_FAILURES = 5;
  // Lets resume() pick up a Veriph.One session after the same-tab redirect round trip.
  const STORAGE_KEY = 'gatewayVerify.pending';
  // A page that wakes up (bfcache, a resumed mobile tab) reopens its stream within this many
  // ms, at random: many tabs woken together by the same event do not arrive together.
  const REOPEN_JITTER_MS = 1000;
  // verify.js's own retries wait pollInterval × 2^n ms, at most this, times a random factor
  // in [0.5, 1): clients that lost the gateway together do not come back together.
  const MAX_BACKOFF_MS = 30000;
  // Running verifications of this tab by session id: one stream per session per tab.
  const live = new Map();
  // What tells a page it woke up: back/forward cache, Page Lifecycle resume, tab shown, network.
  const WAKEUPS = [[window, 'pageshow'], [window, 'online'], [document, 'visibilitychange'], [document, 'resume']]
    .filter((w) => w[0].addEventListener);

  class GatewayError extends Error {
    constructor(code, message, status = 0) {
      super(message);
      this.name = 'GatewayError';
      this.code = code;
      this.status = status;
    }
  }

  const parse = (text) => {
    try { return JSON.parse(text); } catch { return null; }
  };

  // A throwing page callback must not derail the state machine (and lose the outcome);
  // rethrowing from a timer still puts it in the console where the developer will see it.
  const call = (fn, arg) => {
    if (typeof fn !== 'function') return;
    try { fn(arg); } catch (e) { setTimeout(() => { throw e; }); }
  };

  const storage = (value) => {
    try {
      if (value === undefined) return parse(sessionStorage.getItem(STORAGE_KEY));
      if (value) sessionStorage.setItem(STORAGE_KEY, JSON.stringify(value));
      else sessionStorage.removeItem(STORAGE_KEY);
    } catch { /* storage disabled: resume() is then simply unavailable */ }
    return null;
  };

  async function errorFrom(res) {
    const body = parse(await res.text().catch(() => ''));
    const err = (body && body.error) || {};
    return new GatewayError(err.code || 'http_' + res.status,
      err.message || 'The gateway answered HTTP ' + res.status, res.status);
  }

  // One verification attempt. `saved` is a session created earlier (resume after redirect).
  function run(options, saved) {
    const o = { pollInterval: 3000, ...options }; // veriphoneWindow: 'popup' unless 'same'
    const base = String(o.gatewayUrl || '').replace(/\/$/, '');
    const ctl = new AbortController();
    const handle = { sessionId: saved ? saved.id : null, cancel: () => cleanup() };
    let finished = false;
    let es = null;
    let timer = 0;
    let popup = null;
    let remembered = Boolean(saved);
    let retryNow = null; // while the poller waits: ends the wait early (on a wake-up)
    const backoff = (n) => Math.min(o.pollInterval * 2 ** n, MAX_BACKOFF_MS) * (0.5 + Math.random() / 2);

    function cleanup() {
      finished = true;
      clearTimeout(timer);
      if (es) es.close();
      ctl.abort();
      if (live.get(handle.sessionId) === ready) live.delete(handle.sessionId);
      for (const [target, type] of WAKEUPS) target.removeEventListener(type, wake);
      if (popup && !popup.closed) popup.close();
      if (remembered) storage(null);
    }

    function finish(outcome) {
      if (finished || !outcome || !outcome.status) return;
      cleanup();
      call(o.onOutcome, outcome);
      // Truecaller advises treating "no action before the timeout" like "no app": offer the
      // alternate flow. The outcome is still delivered first so the page can record it.
      // "Use another number" is the same request: Truecaller can only vouch for the SIM's own.
      if (outcome.status === 'expired') call(o.onFallback, 'expired');
      else if (outcome.reason === 'use_another_number') call(o.onFallback, 'use_another_number');
    }

    // The end without an outcome: an error for onError, or a reason for onFallback.
    const stop = (fn, arg) => {
      if (finished) return;
      cleanup();
      call(fn, arg);
    };
    const fail = (err) => stop(o.onError, err);

    const snapshot = (snap) => {
      if (snap && snap.status !== 'pending') finish(snap.outcome);
    };

    let current = null; // the session whose stream this run holds

    // The page woke up (bfcache restore, a resumed tab, the network back): a stream the
    // browser closed while it slept is opened again, once, and catches up from the gateway;
    // a pending back-off ends early, once. Either after a random pause.
    function wake(ev) {
      if (finished || (ev.type === 'pageshow' && !ev.persisted) || document.visibilityState === 'hidden') return;
      // Only a stream the browser closed for good (readyState 2); a live one reconnects itself.
      const go = retryNow || (es && es.readyState === 2 && subscribe);
      if (!go) return;
      retryNow = es = null; // (a poller has no stream)
      clearTimeout(timer);
      timer = setTimeout(go, Math.random() * REOPEN_JITTER_MS, current);
    }
    for (const [target, type] of WAKEUPS) target.addEventListener(type, wake);

    function subscribe(s) {
      if (finished) return;
      current = s;
      const pollUrl = base + s.status_url + '?wait=' + LONG_POLL_WAIT;
      if (typeof EventSource !== 'function') return poll(pollUrl, 0);
      let errors = 0;
      // Giving up on SSE: long polling, after a back-off (never all pages in the same instant).
      const toPolling = () => {
        es.close();
        es = null;
        clearTimeout(timer);
        poll(pollUrl, backoff(0));
      };
      es = new EventSource(base + s.stream_url);
      timer = setTimeout(toPolling, FIRST_EVENT_MS);
      const on = (type, fn) => es.addEventListener(type, (ev) => {
        errors = 0;
        clearTimeout(timer);
        const data = parse(ev.data);
        if (data && !finished) fn(data);
      });
      on('status', snapshot);
      on('progress', (p) => p.stage && call(o.onProgress, p.stage));
      // finish() closes the EventSource right here, before the server ends the stream,
      // so the browser never schedules a reconnect.
      on('outcome', finish);
      es.onerror = () => {
        // CLOSED means the browser gave up for good (HTTP error, wrong content type).
        if (!finished && (es.readyState === 2 || ++errors >= MAX_STREAM_ERRORS)) toPolling();
      };
    }

    // The wait before the next poll (a back-off after a failure); wake() may end it early.
    const sleep = (ms) => new Promise((resolve) => {
      retryNow = resolve;
      timer = setTimeout(resolve, ms);
    });

    // Long polling, after `delay` ms; ends with the outcome, or onError once retries run out.
    async function poll(pollUrl, delay) {
      let failures = 0;
      while (!finished) {
        await sleep(delay);
        retryNow = null;
        const started = Date.now();
        try {
          const res = await fetch(pollUrl, {
            headers: { Accept: 'application/json' }, cache: 'no-store', signal: ctl.signal,
          });
          if (res.ok) {
            failures = 0;
            snapshot(await res.json());
            // The server held the request until something changed or `wait` ran out, so
            // normally go again at once; the floor only guards against a server that
            // ignores `wait` and would otherwise be hammered.
            delay = o.pollInterval - (Date.now() - started);
          } else if (res.status < 500 && res.status !== 429) {
            // 404 and friends: the session is gone and retrying cannot bring it back.
            return fail(await errorFrom(res));
          } else {
            throw res.status; // 5xx, 429: counted and retried below
          }
        } catch (e) {
          if (finished) return;
          if (++failures >= MAX_POLL_FAILURES) {
            return fail(new GatewayError('network_error', 'Lost contact with the verification gateway'));
          }
          delay = backoff(failures);
        }
      }
    }

    function launch(s) {
      if (o.provider === 'truecaller') {
        const link = s.truecaller && s.truecaller.deeplink;
        if (!link) throw new Error('no deep link');
        if (typeof o.openDeeplink === 'function') o.openDeeplink(link);
        else window.location.href = link;
        if (o.skipFocusCheck) return subscribe(s);
        timer = setTimeout(() => {
          if (document.hasFocus()) stop(o.onFallback, 'no_app');
          else subscribe(s);
        }, FOCUS_CHECK_MS);
        return;
      }
      const url = s.veriphone && s.veriphone.redirect_url;
      if (!url) throw new Error('no redirect URL');
      if (popup && !popup.closed) {
        popup.location.href = url;
      } else {
        // No popup (blocked or not wanted): this page is about to unload, so leave enough
        // behind for resume() on the page the flow returns to.
        storage({ id: s.id, stream_url: s.stream_url, status_url: s.status_url, base });
        remembered = true;
        window.location.assign(url);
      }
      subscribe(s);
    }

    // Popup blockers only honour window.open() during the click that called start(), and
    // the redirect URL is not known yet: open an empty window now and point it later.
    if (!saved && o.provider === 'veriphone' && o.veriphoneWindow !== 'same') {
      popup = window.open('', 'gateway-veriphone', 'popup,width=480,height=720');
      // Sever window.opener so the provider's page can never navigate this one.
      try { if (popup) popup.opener = null; } catch { /* already cross-origin: harmless */ }
    }

    async function create() {
      let s;
      try {
        // JSON.stringify leaves out the fields that are undefined.
        const body = { provider: o.provider, phone: o.phone || undefined, user_ref: o.userRef || undefined };
        // A start ticket from the site's backend (when the gateway requires one): a string, or a
        // function of the body returning one (or its Promise), called now, e.g. to fetch it.
        const t = typeof o.ticket == 'function' ? await o.ticket(body) : o.ticket;
        const res = await fetch(base + '/v1/sessions', {
          method: 'POST',
          headers: { 'Content-Type': 'application/json', Accept: 'application/json', ...(t && { Authorization: 'Ticket ' + t }) },
          body: JSON.stringify(body),
          signal: ctl.signal,
        });
        if (res.status !== 201) throw await errorFrom(res);
        s = await res.json();
      } catch (e) {
        fail(e instanceof GatewayError ? e
          : new GatewayError('network_error', 'Could not reach the verification gateway'));
        return handle;
      }
      if (finished) return handle; // cancelled while the session was being created
      handle.sessionId = s.id;
      live.set(s.id, ready);
      try {
        launch(s);
      } catch (e) {
        fail(new GatewayError('client_error', String(e && e.message)));
      }
      return handle;
    }

    // create() reads `ready` only after its first await, when it is assigned.
    const ready = saved ? Promise.resolve(handle) : create();
    if (saved) {
      live.set(saved.id, ready);
      subscribe(saved);
    }
    // Errors reach onError, never a rejection; cancel() works before the promise settles.
    ready.cancel = handle.cancel;
    return ready;
  }

  window.GatewayVerify = Object.freeze({
    start: (options) => run(options || {}),
    // Continue a Veriph.One session started in this tab before the same-tab redirect.
    // Returns a Promise of the handle, or null when there is nothing to resume.
    resume: (options) => {
      const saved = storage();
      if (!saved || !saved.id) return null;
      // One stream per session per tab: a second resume() gets the running verification.
      return live.get(saved.id) || run({ ...options, gatewayUrl: saved.base }, saved);
    },
    GatewayError,
  });
})();
