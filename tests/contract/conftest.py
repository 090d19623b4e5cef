"""The runtime's plain-PEFT adapters of every family serve as the contract's well-formed inputs."""

from tests.runtime.conftest import adapter_dirs  # noqa: F401
