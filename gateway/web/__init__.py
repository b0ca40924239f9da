"""The HTTP layer: the routes of the public API, the stream, the demo page, and the container they read."""
