"""FFmpeg for Gradio on a machine that has none. Gradio encodes streamed audio with an `ffmpeg`
executable and inspects media with `ffprobe`, both looked up on PATH. When they are missing, this
puts on PATH (for this process and its children): the static `ffmpeg` build that the imageio-ffmpeg
package ships, and an `ffprobe` that answers the queries Gradio makes (`-show_format`,
`-show_streams`, `-select_streams a|v`, `-show_entries format=duration`, JSON / csv / default output)
by reading the file with PyAV (the `av` package, FFmpeg's own libraries). Installed tools win: this
only fills in what is absent."""

from __future__ import annotations

import json
import os
import shutil
import sys
from fractions import Fraction
from pathlib import Path

from app.cache_dir import studio_cache_dir

REPO = Path(__file__).resolve().parents[1]


def _tools_dir() -> Path:
    return studio_cache_dir() / "bin"


def _place(path: Path, make) -> None:
    """Write a tool atomically (another process may be reading it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    make(tmp)
    os.replace(tmp, path)


def ensure_ffmpeg_tools() -> None:
    """Put `ffmpeg` / `ffprobe` on PATH when the machine lacks them (see the module doc)."""
    need_ffmpeg, need_probe = shutil.which("ffmpeg") is None, shutil.which("ffprobe") is None
    if not (need_ffmpeg or need_probe):
        return
    try:
        import imageio_ffmpeg
        import av  # noqa: F401
    except ImportError:
        return  # Gradio then says plainly that ffmpeg is missing
    folder = _tools_dir()
    try:
        _place_tools(folder, need_ffmpeg, need_probe, imageio_ffmpeg.get_ffmpeg_exe)
    except OSError as e:  # a cache that is a file, read-only, on a full disk: the studio starts without them
        print(f"WARNING: cannot put ffmpeg and ffprobe into {folder} ({e.strerror or e}); the page's streamed audio "
              "needs them: set MING_STUDIO_CACHE to a writable folder, or install ffmpeg", file=sys.stderr, flush=True)
        return
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def _place_tools(folder: Path, need_ffmpeg: bool, need_probe: bool, ffmpeg_exe) -> None:
    """Write the `ffmpeg` link and the `ffprobe` script the machine lacks into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if need_ffmpeg:
        exe = ffmpeg_exe()
        link = folder / "ffmpeg"
        if not link.exists() or os.path.realpath(link) != os.path.realpath(exe):
            _place(link, lambda tmp: os.symlink(exe, tmp))
    if need_probe:
        script = (f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                  "from app.ffmpeg_tools import probe_main\nsys.exit(probe_main(sys.argv[1:]))\n")
        probe = folder / "ffprobe"
        if not probe.exists() or probe.read_text() != script:
            def write(tmp: Path) -> None:
                tmp.write_text(script)
                tmp.chmod(0o755)
            _place(probe, write)


# --------------------------------------------------------------------------- the probe


def _num(value) -> str | None:
    return None if value is None else f"{float(value):.6f}"


def _stream_info(index: int, stream) -> dict:
    ctx = stream.codec_context
    info: dict = {"index": index, "codec_name": ctx.name, "codec_type": stream.type}
    tb = stream.time_base or Fraction(1, 1)
    if stream.duration is not None:
        info["duration"] = _num(stream.duration * tb)
    if stream.start_time is not None:
        info["start_time"] = _num(stream.start_time * tb)
    if stream.type == "audio":
        info.update(sample_rate=str(ctx.sample_rate), channels=ctx.channels)
    elif stream.type == "video":
        info.update(width=ctx.width, height=ctx.height, pix_fmt=getattr(ctx.format, "name", None))
        if stream.average_rate:
            info["avg_frame_rate"] = f"{stream.average_rate.numerator}/{stream.average_rate.denominator}"
    return info


def probe(path: str, select: str | None = None) -> dict:
    """ffprobe's `-show_format -show_streams` answer for a media file."""
    import av

    with av.open(path) as container:
        streams = [_stream_info(i, s) for i, s in enumerate(container.streams)]
        if select:
            streams = [s for s in streams if s["codec_type"].startswith({"a": "audio", "v": "video"}.get(select, select))]
        fmt = {"filename": path, "format_name": container.format.name, "nb_streams": len(container.streams),
               "size": str(os.path.getsize(path))}
        if container.duration is not None:
            fmt["duration"] = _num(container.duration / 1_000_000)
        if container.bit_rate:
            fmt["bit_rate"] = str(container.bit_rate)
    return {"streams": streams, "format": fmt}


def probe_main(argv: list[str]) -> int:
    """`ffprobe [options] FILE` for the options Gradio uses; exit 1 with a message for anything else."""
    select = entries = None
    out_format, files = "default", []
    args = iter(argv)
    for arg in args:
        if arg in ("-v", "-loglevel"):
            next(args, None)
        elif arg in ("-show_format", "-show_streams", "-hide_banner"):
            pass
        elif arg == "-select_streams":
            select = next(args, None)
        elif arg in ("-print_format", "-of"):
            out_format = next(args, "default") or "default"
        elif arg == "-show_entries":
            entries = next(args, "")
        elif arg == "-i":
            files.append(next(args, ""))
        elif not arg.startswith("-"):
            files.append(arg)
        else:
            print(f"ffprobe (PyAV stand-in): unsupported option {arg}", file=sys.stderr)
            return 1
    if len(files) != 1:
        print("ffprobe (PyAV stand-in): give exactly one input file", file=sys.stderr)
        return 1
    try:
        result = probe(files[0], select)
    except Exception as e:  # noqa: BLE001  (like ffprobe: a message and a failing exit status)
        print(f"{files[0]}: {e}", file=sys.stderr)
        return 1
    if entries and entries.startswith("format="):
        keys = entries.split("=", 1)[1].split(",")
        values = [str(result["format"].get(k, "N/A")) for k in keys]
        if out_format.startswith("json"):
            print(json.dumps({"format": dict(zip(keys, values))}))
        elif "nokey=1" in out_format or out_format.startswith("csv"):
            print("\n".join(values))
        else:
            print("[FORMAT]\n" + "\n".join(f"{k}={v}" for k, v in zip(keys, values)) + "\n[/FORMAT]")
        return 0
    print(json.dumps(result, indent=2))
    return 0
