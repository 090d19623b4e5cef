"""``adapterhub chat``: the click command; the work happens in ``adapterhub.chat.repl``."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--base",
    help="Base model for local mode: a Hub id, a folder, builtin:tiny-llama or a .gguf file. "
    "Default: the adapter's base.",
)
@click.option(
    "--adapter", help="Adapter to start with: a store name, folder or REPO_ID[@REV] (a model id with --url)."
)
@click.option(
    "--url", help="Chat through an OpenAI-compatible server (e.g. adapterhub serve) instead of in-process."
)
@click.option(
    "--api-key", envvar="ADAPTERHUB_API_KEY", help="The server's API key [env: ADAPTERHUB_API_KEY]."
)
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2), help="0 is greedy."
)
def chat(
    base: str | None,
    adapter: str | None,
    url: str | None,
    api_key: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
) -> None:
    """Chat with a base model and its adapters; switch and compare them mid-conversation.

    With standard input piped in (echo hi | adapterhub chat ...) it answers once and exits.
    """
    from rich.console import Console

    from adapterhub.chat.repl import open_backend, open_session, piped_question, run_repl
    from adapterhub.runtime.api import SamplingParams

    console = Console(highlight=False)
    question = piped_question()
    backend = open_backend(console, base, adapter, url, api_key)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        session = open_session(console, backend, adapter, system, params)
        if question is None:
            run_repl(session)
        else:
            session.ask(question)
    finally:
        backend.close()
