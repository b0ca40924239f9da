"""Fake provider APIs, as plain Starlette apps: for tests and for `gateway serve --sandbox`."""
