-- The retention task looks for completed sessions whose personal data is still there,
-- oldest first. Purged rows leave this index, so each pass stays cheap however much
-- history the table keeps.
CREATE INDEX sessions_unpurged ON sessions (completed_at)
    WHERE completed_at IS NOT NULL AND purged_at IS NULL;
