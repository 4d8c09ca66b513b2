"""Voice activity detection: the silero-vad network (its weights ship inside the `silero-vad`
package), run with numpy for one 32 ms window at a time."""

from .silero import SileroVad, VadUnavailable

__all__ = ["SileroVad", "VadUnavailable"]
