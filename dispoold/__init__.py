"""dispoold: a pool of preloaded, paused disposable VMs, handed out in milliseconds."""

from pathlib import Path

__version__ = "0.1.0"

#: Where the daemon listens unless ``[daemon] socket`` says otherwise, and where clients
#: look unless ``$DISPOOLD_SOCKET`` does (kept here so that a client finds it without
#: loading the daemon's configuration).
DEFAULT_SOCKET = Path("/run/dispoold/dispoold.sock")
