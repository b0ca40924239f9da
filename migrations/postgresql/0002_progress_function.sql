-- A progress event, and with a Truecaller token callback the token's claim, in one call: one
-- round trip to the server instead of six (BEGIN, lock, bind the token, store the claim, the
-- event, COMMIT). The statements are those the gateway used to send one by one, in the same
-- order and under the same row lock; each takes a fresh snapshot (a VOLATILE function under
-- READ COMMITTED), so what a statement sees after waiting for a lock is what the separate
-- statements saw.
--
-- The session is named by its id, or (p_session NULL) by its provider's reference: a Truecaller
-- token callback names its session by requestId, and finding it is then part of the same call.
--
-- Returns one row: the event's id (NULL when no event was written), whether the session had
-- events before, the pending session's id, provider, phone and user_ref (NULL unless it is
-- pending), and the claim's result ('stored', 'reused', 'repeat', 'gone'; NULL without a
-- claim). A claim on a session that is not pending is 'gone' and writes nothing.
CREATE OR REPLACE FUNCTION gateway_progress(
    p_session        TEXT,
    p_data           TEXT,
    p_now            DOUBLE PRECISION,
    p_expires_at     DOUBLE PRECISION,          -- NULL: the deadline stays
    p_origin         TEXT,                      -- the writing process, in the notification
    p_lazy           BOOLEAN,                   -- commit without waiting for the disk
    p_token_hash     TEXT,                      -- NULL: no token claim
    p_endpoint       TEXT,
    p_access_token   TEXT,
    p_received_at    DOUBLE PRECISION,
    p_token_expires  DOUBLE PRECISION,
    p_lease_until    DOUBLE PRECISION,
    p_forget_before  DOUBLE PRECISION,          -- not NULL: forget token hashes used before this
    p_provider       TEXT,                      -- with p_session NULL: the session of this
    p_provider_ref   TEXT,                      -- provider and reference
    OUT o_event_id   BIGINT,
    OUT o_seen       BOOLEAN,
    OUT o_session    TEXT,
    OUT o_provider   TEXT,
    OUT o_phone      TEXT,
    OUT o_user_ref   TEXT,
    OUT o_claim      TEXT
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_bound  TEXT;
    v_stored INTEGER;
BEGIN
    IF p_lazy THEN
        -- The next durable commit of any session flushes this one too.
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF p_session IS NULL THEN
        SELECT s.id, s.provider, s.phone, s.user_ref INTO o_session, o_provider, o_phone, o_user_ref
            FROM sessions s
            WHERE s.provider_ref = p_provider_ref AND s.provider = p_provider AND s.status = 'pending'
            FOR UPDATE;
    ELSE
        SELECT s.id, s.provider, s.phone, s.user_ref INTO o_session, o_provider, o_phone, o_user_ref
            FROM sessions s WHERE s.id = p_session AND s.status = 'pending' FOR UPDATE;
    END IF;
    IF p_token_hash IS NOT NULL THEN
        IF o_session IS NULL THEN
            o_claim := 'gone';  -- finished, or never was: nothing of the token is stored
            RETURN;
        END IF;
        IF p_forget_before IS NOT NULL THEN
            -- SKIP LOCKED: two processes sweeping at once never wait for each other.
            DELETE FROM truecaller_tokens_used WHERE token_hash IN (
                SELECT u.token_hash FROM truecaller_tokens_used u
                WHERE u.used_at < p_forget_before FOR UPDATE SKIP LOCKED);
        END IF;
        -- Bind the token to this session unless it is bound already (a racing insert of the
        -- same hash waits for the first to commit); either way the row that holds it comes back.
        INSERT INTO truecaller_tokens_used AS u (token_hash, session_id, used_at)
            VALUES (p_token_hash, o_session, p_received_at)
            ON CONFLICT (token_hash) DO UPDATE SET used_at = u.used_at
            RETURNING u.session_id INTO v_bound;
        IF v_bound <> o_session THEN
            o_claim := 'reused';
            RETURN;
        END IF;
        -- The session's row is locked and pending: only another callback's claim stops this one.
        INSERT INTO truecaller_callbacks
            (session_id, endpoint, access_token, received_at, token_expires_at, lease_until)
            VALUES (o_session, p_endpoint, p_access_token, p_received_at, p_token_expires, p_lease_until)
            ON CONFLICT (session_id) DO NOTHING;
        GET DIAGNOSTICS v_stored = ROW_COUNT;
        IF v_stored <> 1 THEN
            o_claim := 'repeat';
            RETURN;
        END IF;
        o_claim := 'stored';
    END IF;
    IF o_session IS NULL THEN
        RETURN;
    END IF;
    -- After the lock: every earlier event of the session is committed and seen here.
    o_seen := EXISTS (SELECT 1 FROM session_events e WHERE e.session_id = o_session);
    INSERT INTO session_events (session_id, kind, data, created_at)
        VALUES (o_session, 'progress', p_data, p_now) RETURNING id INTO o_event_id;
    UPDATE sessions SET updated_at = p_now, expires_at = COALESCE(p_expires_at, expires_at)
        WHERE id = o_session;
    PERFORM pg_notify('gateway_events', o_session || ':' || o_event_id || ':' || p_origin);
END
$$;
