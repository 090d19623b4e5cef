"""The hub manager: a local adapter store, and push / pull of adapters on the Hugging Face Hub.

Other parts of adapterhub use ``resolve`` to turn a store name, local folder or ``REPO_ID[@REV]`` into
a local adapter folder, and ``push_folder`` to share an adapter or merged model.
"""

from adapterhub.hub.adapter import check_base_model
from adapterhub.hub.remote import PullResult, PushResult, pull, push_folder
from adapterhub.hub.resolve import resolve

__all__ = ["PullResult", "PushResult", "check_base_model", "pull", "push_folder", "resolve"]
