"""The Gradio studio UI of Ming Omni Studio: a model banner on top and one tab per capability
(Chat, Live, Speech, Voice, Image), built by `app.studio.build_studio` around an engine client.
"""

import os

# Must happen before gradio is imported anywhere: otherwise gradio contacts api.gradio.app and
# huggingface.co from background threads at launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


from app.ffmpeg_tools import ensure_ffmpeg_tools  # noqa: E402

ensure_ffmpeg_tools()  # Gradio's streamed audio needs ffmpeg (and ffprobe) on PATH
