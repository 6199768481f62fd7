"""OpenAI-compatible HTTP server and its backends."""
