"""Ray's token authentication, for every command that talks to an existing cluster.

`ray start --head` turns token authentication on when `~/.ray/auth_token`
exists; a client then needs `RAY_AUTH_MODE=token` and the token (that file,
or `RAY_AUTH_TOKEN`). Ray reads the mode when it is first imported, so
`use_auth_token` runs before anything imports Ray; this module imports
nothing of Ray for that reason.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_auth_token() -> bool:
    """When a token is at hand and `RAY_AUTH_MODE` is not set, set it to `token`; returns whether it is on."""
    if not os.environ.get("RAY_AUTH_MODE") and (
            os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    return os.environ.get("RAY_AUTH_MODE") == "token"
