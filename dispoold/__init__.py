"""dispoold: a pool of preloaded, paused disposable VMs, handed out in milliseconds."""

__version__ = "0.1.0"
