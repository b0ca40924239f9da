-- Idempotency-Key of POST /v1/sessions: the same key (and body) within the session's ttl
-- returns the same session instead of a second provider call. Written in the same
-- transaction as the session; deleted once expired.
CREATE TABLE idempotency_keys (
    key_hash    TEXT PRIMARY KEY,            -- sha256 of the key, never the key
    body_hash   TEXT NOT NULL,               -- sha256 of the request's fields: another body is a reuse
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    answer      TEXT NOT NULL,               -- the 201 body, as first sent
    expires_at  REAL NOT NULL
);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);
