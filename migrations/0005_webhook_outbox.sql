-- Outcome events for the site's backend, written in the same transaction as the outcome
-- (a transactional outbox) and sent by the delivery worker, at least once.
-- payload holds the outcome (personal data): a row is deleted by retention once it is
-- delivered or failed.
CREATE TABLE webhook_outbox (
    id               TEXT PRIMARY KEY,        -- the webhook-id header: receivers deduplicate on it
    session_id       TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    type             TEXT NOT NULL,           -- e.g. session.completed
    payload          TEXT NOT NULL,           -- the JSON body, byte for byte as signed and sent
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    enqueued_at      REAL NOT NULL,           -- max_age counts from here (a manual retry resets it)
    next_attempt_at  REAL NOT NULL,
    finished_at      REAL,                    -- delivered or failed at
    last_status      INTEGER,                 -- the receiver's last HTTP status, if it answered
    last_error       TEXT                     -- a short fixed word: timeout, connect, status, ...
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_outbox_finished ON webhook_outbox (finished_at) WHERE status != 'pending';
