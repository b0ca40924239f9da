"""Storage: the `Store` interface the services use (`base`) and its SQLite implementation (`sqlite`)."""
