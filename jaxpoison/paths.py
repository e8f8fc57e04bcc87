"""Where the shared offline data lives when a config leaves its path empty.

Configs record "" and the path is resolved when a run starts, so a workdir does not
hold one checkout's absolute path and resumes from any checkout.
"""

import os

CHECKOUT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))


def shared_data_dir(name: str, env_var: str) -> str:
    """`$env_var`, else ../shared/data/<name> beside the checkout."""
    return os.environ.get(env_var) or os.path.join(
        os.path.dirname(CHECKOUT), "shared", "data", name
    )
