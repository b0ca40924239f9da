-- The schema of SQLite's migrations 0001-0008 in one, for PostgreSQL. Times are Unix seconds
-- (DOUBLE PRECISION, as SQLite's REAL); JSON columns are TEXT holding the bytes the gateway
-- wrote (outcome, provider_data, event data, webhook payload: signed and sent as stored).

-- Verification sessions: one row per attempt, one terminal outcome each.
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,           -- the capability id handed to the browser
    provider      TEXT NOT NULL CHECK (provider IN ('truecaller', 'veriphone')),
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'verified', 'rejected', 'failed', 'expired')),
    reason        TEXT,
    provider_ref  TEXT UNIQUE,                -- Truecaller request nonce / Veriph.One session uuid
    phone         TEXT,                       -- the number the caller asked to verify (E.164)
    user_ref      TEXT,
    provider_data TEXT,                       -- JSON: deep link, redirect url, ...
    outcome       TEXT,                       -- JSON outcome object once terminal
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL,
    expires_at    DOUBLE PRECISION NOT NULL,
    completed_at  DOUBLE PRECISION,
    purged_at     DOUBLE PRECISION
);

-- The expiry task reads only pending sessions, oldest deadline first.
CREATE INDEX sessions_pending_expiry ON sessions (expires_at) WHERE status = 'pending';
CREATE INDEX sessions_completed ON sessions (completed_at) WHERE completed_at IS NOT NULL;
-- The retention task looks for completed sessions whose personal data is still there.
CREATE INDEX sessions_unpurged ON sessions (completed_at)
    WHERE completed_at IS NOT NULL AND purged_at IS NULL;
-- Old sessions are found in completion order among the purged ones.
CREATE INDEX sessions_purged ON sessions (completed_at) WHERE purged_at IS NOT NULL;

-- Everything a subscriber was (or would have been) told: progress and the outcome. Writers
-- lock the session's row before inserting, so one session's ids rise in commit order.
CREATE TABLE session_events (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('progress', 'outcome')),
    data        TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX session_events_by_session ON session_events (session_id, id);

-- Truecaller token callbacks accepted but not yet turned into an outcome. A row is written
-- before the callback is answered and deleted once the profile fetch finished, so a restart
-- can resume the fetch. access_token is a secret bearer token. The fetch belongs to the
-- process that stored (or last took) the row until lease_until.
CREATE TABLE truecaller_callbacks (
    session_id        TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,  -- first callback wins
    endpoint          TEXT NOT NULL,          -- the checked, normalised profile URL
    access_token      TEXT NOT NULL,
    received_at       DOUBLE PRECISION NOT NULL,
    token_expires_at  DOUBLE PRECISION NOT NULL,  -- received_at + 600: Truecaller tokens live 10 minutes
    lease_until       DOUBLE PRECISION NOT NULL DEFAULT 0
);

-- Hashes of Truecaller access tokens already bound to a session, kept for the token's life
-- (10 minutes) and a margin: one token must not verify a second session (login CSRF).
CREATE TABLE truecaller_tokens_used (
    token_hash  TEXT PRIMARY KEY,            -- sha256 of the token, never the token
    session_id  TEXT NOT NULL,
    used_at     DOUBLE PRECISION NOT NULL
);
CREATE INDEX truecaller_tokens_used_by_age ON truecaller_tokens_used (used_at);

-- Outcome events for the site's backend, written in the same transaction as the outcome
-- (a transactional outbox) and sent by the delivery worker, at least once. payload holds the
-- outcome (personal data): a row is deleted by retention once it is delivered or failed.
CREATE TABLE webhook_outbox (
    id               TEXT PRIMARY KEY,        -- the webhook-id header: receivers deduplicate on it
    session_id       TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    type             TEXT NOT NULL,           -- e.g. session.completed
    payload          TEXT NOT NULL,           -- the JSON body, byte for byte as signed and sent
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    enqueued_at      DOUBLE PRECISION NOT NULL,  -- max_age counts from here (a manual retry resets it)
    next_attempt_at  DOUBLE PRECISION NOT NULL,  -- also the end of a delivery worker's lease
    finished_at      DOUBLE PRECISION,           -- delivered or failed at
    last_status      INTEGER,                    -- the receiver's last HTTP status, if it answered
    last_error       TEXT                        -- a short fixed word: timeout, connect, status, ...
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_outbox_finished ON webhook_outbox (finished_at) WHERE status != 'pending';
-- Retention deletes old finished sessions; the rows that reference one are found (and
-- deleted with it, ON DELETE CASCADE) through these instead of a scan per session.
CREATE INDEX webhook_outbox_by_session ON webhook_outbox (session_id);

-- Idempotency-Key of POST /v1/sessions: the same key (and body) within the session's ttl
-- returns the same session instead of a second provider call. Written in the same
-- transaction as the session; deleted once expired.
CREATE TABLE idempotency_keys (
    key_hash    TEXT PRIMARY KEY,            -- sha256 of the key, never the key
    body_hash   TEXT NOT NULL,               -- sha256 of the request's fields: another body is a reuse
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    answer      TEXT NOT NULL,               -- the 201 body, as first sent
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);
CREATE INDEX idempotency_keys_by_session ON idempotency_keys (session_id);

-- Start tickets already used: a ticket starts one session. The hash is written in the same
-- transaction as the session it started and kept until the ticket expires (a later use is
-- refused as expired anyway).
CREATE TABLE start_tickets_used (
    ticket_hash  TEXT PRIMARY KEY,           -- sha256 of the ticket, never the ticket
    expires_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX start_tickets_used_by_expiry ON start_tickets_used (expires_at);
