"""``adapterhub serve``: an OpenAI-compatible HTTP server over the multi-adapter runtime."""
