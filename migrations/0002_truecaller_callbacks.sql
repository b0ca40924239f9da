-- Truecaller token callbacks accepted but not yet turned into an outcome.
-- A row is written before the callback is answered and deleted once the profile fetch
-- finished, so a restart can resume the fetch. access_token is a secret bearer token.
CREATE TABLE truecaller_callbacks (
    session_id        TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,  -- first callback wins
    endpoint          TEXT NOT NULL,          -- the checked, normalised profile URL
    access_token      TEXT NOT NULL,
    received_at       REAL NOT NULL,
    token_expires_at  REAL NOT NULL           -- received_at + 600: Truecaller tokens live 10 minutes
);
