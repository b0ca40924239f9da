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
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    completed_at  REAL,
    purged_at     REAL
);

-- The expiry task reads only pending sessions, oldest deadline first.
CREATE INDEX sessions_pending_expiry ON sessions (expires_at) WHERE status = 'pending';
CREATE INDEX sessions_completed ON sessions (completed_at) WHERE completed_at IS NOT NULL;

-- Everything a subscriber was (or would have been) told: progress and the outcome.
CREATE TABLE session_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL CHECK (kind IN ('progress', 'outcome')),
    data        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX session_events_by_session ON session_events (session_id, id);
