-- Start tickets already used: a ticket starts one session. The hash is written in the same
-- transaction as the session it started and kept until the ticket expires (a later use is
-- refused as expired anyway).
CREATE TABLE start_tickets_used (
    ticket_hash  TEXT PRIMARY KEY,           -- sha256 of the ticket, never the ticket
    expires_at   REAL NOT NULL
);
CREATE INDEX start_tickets_used_by_expiry ON start_tickets_used (expires_at);
-- Retention deletes old finished sessions; the rows that reference one are found (and
-- deleted with it, ON DELETE CASCADE) through these instead of a scan per session.
CREATE INDEX webhook_outbox_by_session ON webhook_outbox (session_id);
CREATE INDEX idempotency_keys_by_session ON idempotency_keys (session_id);
-- Old sessions are found in completion order among the purged ones.
CREATE INDEX sessions_purged ON sessions (completed_at) WHERE purged_at IS NOT NULL;
