"""Where the studio keeps its files on this machine: $MING_STUDIO_CACHE, else ~/.cache/ming-omni-studio (the same
folder the engine's tiny demo checkpoint and saved voices go to; the studio may not import the engine for it)."""
import os
from pathlib import Path


def studio_cache_dir() -> Path:
    return Path(os.environ.get("MING_STUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ming-omni-studio"))
