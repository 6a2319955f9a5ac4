"""Which W&B mode a process can use without hanging: credentials and ``WANDB_MODE``.

Plain ``os``/``netrc`` code, apart from the loggers, so that the report (and anything else that
publishes a finished result) can ask it without importing Lightning or torch.
"""

from __future__ import annotations

import netrc
import os


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """``"offline"`` when W&B would otherwise fail or hang (no mode set, no credentials), else None."""
    return None if os.environ.get("WANDB_MODE") or wandb_has_credentials() else "offline"
