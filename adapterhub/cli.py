"""The ``adapterhub`` command line: a thin table of commands, each living next to the library it drives.

Commands are imported lazily so ``adapterhub --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
import warnings

import click

from adapterhub.errors import UserError

# In the order of a workflow, which is how ``adapterhub --help`` lists them.
COMMANDS: dict[str, str] = {
    "train": "adapterhub.train.commands:train",
    "params": "adapterhub.train.commands:params",
    "push": "adapterhub.hub.commands:push",
    "pull": "adapterhub.hub.commands:pull",
    "list": "adapterhub.hub.commands:list_adapters",
    "show": "adapterhub.hub.commands:show",
    "rm": "adapterhub.hub.commands:rm",
    "serve": "adapterhub.server.commands:serve",
    "chat": "adapterhub.chat.cli:chat",
    "eval": "adapterhub.eval.commands:eval_command",
    "merge": "adapterhub.merge_command:merge_command",
    "bench": "adapterhub.bench:bench",
    "tiny": "adapterhub.commands:tiny",
}
# Libraries whose log records stay off the terminal unless --verbose.
LIBRARY_LOGGERS = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "filelock",
    "httpx",
    "huggingface_hub",
    "peft",
    "torch",
    "transformers",
    "urllib3",
)


class LazyGroup(click.Group):
    """Resolves ``name -> module:function`` from its ``lazy_commands`` table on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return None
        module, attr = self.lazy_commands[name].split(":")
        return getattr(importlib.import_module(module), attr)


def _set_verbosity(ctx: click.Context, param: click.Parameter, verbose: bool) -> None:
    # Eager, so it runs before the subcommand's module (and the libraries it imports) is loaded.
    if not verbose:
        quiet_libraries()


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterhub")
@click.option(
    "--verbose",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    envvar="ADAPTERHUB_VERBOSE",
    callback=_set_verbosity,
    help="Show the warnings, logs and progress bars of the libraries underneath (transformers, PEFT, ...).",
)
def cli() -> None:
    """Train, share and serve PEFT adapters of every family from one base model."""


def quiet_libraries() -> None:
    """Keep library chatter off the terminal so an error is one line and our own progress stays readable.

    The environment variables are read when each library is first imported, which happens later.
    """
    for variable in ("TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY", "DATASETS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    # transformers' "Loading weights" bars follow huggingface_hub's switch.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Python warnings from libraries (PEFT, bitsandbytes, torch) are dropped; adapterhub's own still show.
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=r"adapterhub(\.|$)")


def main() -> None:
    """Run the CLI; an expected user error becomes one red line and exit status 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        fail(str(err))
    except OSError as err:
        from adapterhub.paths import disk_error

        known = disk_error(err)
        if known is None:
            raise
        fail(str(known))
    except RecursionError:
        fail("an input file is nested too deeply to read (RecursionError): check the JSON or YAML you passed")
    except pickle.UnpicklingError as err:
        fail(
            f"refused to unpickle a weights file ({str(err).splitlines()[0][:120]}): "
            "only plain tensors are loaded; convert it to .safetensors"
        )
    except MemoryError:
        fail("out of memory: lower the batch size or use quantization=nf4")
    except _torch_oom() as err:
        fail(
            f"out of GPU memory ({str(err).splitlines()[0][:120]}): lower training.batch_size, "
            "enable training.gradient_checkpointing or use model.quantization=nf4"
        )


def fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _torch_oom() -> type[BaseException]:
    torch = sys.modules.get("torch")
    return torch.OutOfMemoryError if torch is not None else MemoryError
