"""Shared inputs: the runtime's plain-PEFT adapters of every family, and the hub tests' fake Hub."""

from tests.hub.conftest import hub, hub_server  # noqa: F401
from tests.runtime.conftest import adapter_dirs  # noqa: F401
