"""The server's default limits and environment variables, light enough for the CLI to read at once.

``adapterhub serve`` binds its port before it imports torch or the app, so a taken port fails at once.
"""

DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_TOKENS_CAP = 2048
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_READ_TIMEOUT_S = 30.0  # for a request's headers, and again for its body
ENV_VAR = "ADAPTERHUB_ALLOW_RUNTIME_LOADING"  # what --allow-runtime-loading reads
