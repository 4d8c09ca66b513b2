"""Ming Omni Studio inference engine: config, checkpoint loading, the Ming-flash-omni model and generation."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m engine.X` is locating its module: a command line is starting
    from engine.command import interrupts_end_quietly as _interrupts_end_quietly

    _interrupts_end_quietly()
