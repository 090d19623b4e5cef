"""The ``adapterhub`` command line: a thin table of commands, each living next to the library it drives.

Commands are imported lazily so ``adapterhub --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

import click

from adapterhub.errors import UserError

COMMANDS: dict[str, str] = {
    "tiny": "adapterhub.commands:tiny",
    "push": "adapterhub.hub.commands:push",
    "pull": "adapterhub.hub.commands:pull",
    "list": "adapterhub.hub.commands:list_adapters",
    "show": "adapterhub.hub.commands:show",
    "rm": "adapterhub.hub.commands:rm",
    "train": "adapterhub.train.commands:train",
    "params": "adapterhub.train.commands:params",
    "bench": "adapterhub.bench:bench",
    "chat": "adapterhub.chat.cli:chat",
    "serve": "adapterhub.server.commands:serve",
    "merge": "adapterhub.merge_command:merge_command",
    "eval": "adapterhub.eval.commands:eval_command",
}


class LazyGroup(click.Group):
    """Resolves ``name -> module:function`` from its ``lazy_commands`` table on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return None
        module, attr = self.lazy_commands[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterhub")
def cli() -> None:
    """Train, share and serve PEFT adapters of every family from one base model."""


def quiet_libraries() -> None:
    """Keep library chatter off the terminal so an error is one line and progress stays readable."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes warns on every import on AVX512 CPUs that an optional kernel package is missing.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Position ids are not supported for parameter efficient")
    # PEFT looks for a config under the base's name to see if embeddings grew; builtin: names have none.
    warnings.filterwarnings("ignore", message="Could not find a config file in builtin:")


def main() -> None:
    """Run the CLI; an expected user error becomes one red line and exit status 1, never a traceback."""
    quiet_libraries()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    except MemoryError:
        click.secho("error: out of memory: lower the batch size or use quantization=nf4", fg="red", err=True)
        sys.exit(1)
    except _torch_oom() as err:
        click.secho(
            f"error: out of GPU memory ({str(err).splitlines()[0][:120]}): lower training.batch_size, "
            "enable training.gradient_checkpointing or use model.quantization=nf4",
            fg="red",
            err=True,
        )
        sys.exit(1)


def _torch_oom() -> type[BaseException]:
    torch = sys.modules.get("torch")
    return torch.OutOfMemoryError if torch is not None else MemoryError
