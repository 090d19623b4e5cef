"""``adapterhub eval``: lm-evaluation-harness over an in-process Engine, many adapters in one pass.

``lm.py`` is the lm-eval ``LM`` (one per adapter, all sharing one engine and one request runner, so
their requests meet in mixed batches); ``run.py`` resolves tasks, runs lm-eval once per adapter and
saves each adapter's results beside it; ``commands.py`` is the click command and its table.
"""
