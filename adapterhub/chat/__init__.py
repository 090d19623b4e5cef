"""``adapterhub chat``: a terminal chat that switches adapters mid-conversation and compares them.

``backends`` talks to a model (the Engine in-process, or an OpenAI-compatible server), ``session``
keeps the conversation, ``view`` draws it, ``commands`` is the slash-command table and ``repl``
reads the user's lines.
"""
