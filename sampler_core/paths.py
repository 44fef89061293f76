"""Where the project keeps its data on disk (budgets, transactions, run history, images)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """$PROMPT_IDE_DATA, else $XDG_DATA_HOME/prompt-ide, else ~/.local/share/prompt-ide."""
    env = os.environ.get("PROMPT_IDE_DATA")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "prompt-ide"
