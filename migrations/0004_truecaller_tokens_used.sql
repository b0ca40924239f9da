-- Hashes of Truecaller access tokens already bound to a session, kept for the token's life
-- (10 minutes) and a margin: one token must not verify a second session (login CSRF).
CREATE TABLE truecaller_tokens_used (
    token_hash  TEXT PRIMARY KEY,            -- sha256 of the token, never the token
    session_id  TEXT NOT NULL,
    used_at     REAL NOT NULL
);
CREATE INDEX truecaller_tokens_used_by_age ON truecaller_tokens_used (used_at);
