-- Which process runs a stored token's profile fetch: the one that stored it (or last took it
-- over), until lease_until. With several processes on one database, a pending claim whose
-- lease has passed belongs to a process that died, and exactly one other takes it over.
ALTER TABLE truecaller_callbacks ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
