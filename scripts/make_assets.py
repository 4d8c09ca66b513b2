#!/usr/bin/env python
"""Write the studio's example media into app/assets/, deterministically, from nothing but this
script: spoken questions (Debian's espeak-ng, resampled to 16 kHz mono PCM16), synthetic images
(PIL drawings), a short webcam-like clip (H.264 MP4 through PyAV), a music-like clip (synthesised
tones), and the two files Chromium's fake capture devices read in browser tests
(`--use-file-for-fake-video-capture=webcam.y4m`, `--use-file-for-fake-audio-capture=mic.wav`).
No third-party media is used.

    apt-get install -y espeak-ng          # once
    python scripts/make_assets.py         # rewrites app/assets/ (about 1.2 MB)
    python scripts/make_assets.py --check # exit 1 if the committed files differ from a fresh run

Running it twice with the same espeak-ng, Pillow and PyAV versions gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.media.audio import load_audio  # noqa: E402  (torchaudio-equivalent resampler)

ASSETS = REPO / "app" / "assets"
SAMPLE_RATE = 16000
PEAK = 0.7  # speech and music are normalised to this peak (about -3 dBFS)

# (file name, espeak-ng voice, words per minute, text)
QUESTIONS = [
    ("what_do_you_see_en.wav", "en-us", 150, "What do you see on the camera?"),
    ("describe_picture_en.wav", "en-us", 150, "Please describe this picture."),
    ("what_is_this_zh.wav", "cmn", 140, "你在摄像头里看到了什么？"),
]

# the browser tests' fake microphone: silence, the question, silence (Chromium loops the file)
MIC_LEAD_S, MIC_TAIL_S = 1.0, 3.0
# the fake camera: a cup sliding along a table, looped by Chromium
Y4M_SIZE, Y4M_FPS, Y4M_FRAMES = (256, 192), 4, 8
# the example clip
CLIP_SIZE, CLIP_FPS, CLIP_SECONDS = (320, 240), 10, 4


# --------------------------------------------------------------------------- audio


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Mono PCM16 WAV of float samples in [-1, 1]."""
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def normalise(samples: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    return samples * (PEAK / peak) if peak > 0 else samples


def espeak(text: str, voice: str, wpm: int) -> np.ndarray:
    """Speech from espeak-ng as float32 at 16 kHz, trimmed of espeak's own silence, normalised."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not installed: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-s", str(wpm), "-w", str(out), text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wave16 = load_audio(out, target_rate=SAMPLE_RATE).numpy()
    loud = np.flatnonzero(np.abs(wave16) > 1e-3)
    if loud.size == 0:
        raise SystemExit(f"espeak-ng produced silence for voice {voice!r}: {text!r}")
    pad = int(0.05 * SAMPLE_RATE)
    return normalise(wave16[max(0, loud[0] - pad): loud[-1] + pad]).astype(np.float32)


def music_tones(seconds: float = 4.0) -> np.ndarray:
    """A short tune: a C-major arpeggio over a held chord, each note with a few harmonics and an
    attack/decay envelope."""
    rate = SAMPLE_RATE
    t = np.arange(int(seconds * rate)) / rate
    out = np.zeros_like(t)

    def note(freq: float, start: float, length: float, level: float) -> None:
        i0, i1 = int(start * rate), min(len(t), int((start + length) * rate))
        tt = t[i0:i1] - start
        env = np.minimum(1.0, tt / 0.02) * np.exp(-3.0 * tt / length)
        tone = sum(np.sin(2 * math.pi * freq * k * tt) / k ** 1.5 for k in (1, 2, 3, 4))
        out[i0:i1] += level * env * tone

    for f in (130.81, 164.81, 196.00):  # held C3 chord
        note(f, 0.0, seconds, 0.25)
    melody = [261.63, 329.63, 392.00, 523.25, 392.00, 329.63, 293.66, 261.63]
    for i, f in enumerate(melody):
        note(f, i * seconds / len(melody), 0.9 * seconds / len(melody) + 0.2, 0.5)
    return normalise(out).astype(np.float32)


# --------------------------------------------------------------------------- pictures


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same everywhere


def cup_scene(width: int, height: int, x_frac: float):
    """A red cup with a handle on a saucer, on a wooden table under a pale wall; the cup's centre at
    `x_frac` of the width. Returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (226, 232, 240))
    d = ImageDraw.Draw(img)
    table_y = int(height * 0.62)
    d.rectangle([0, table_y, width, height], fill=(150, 104, 62))
    for k in range(1, 5):  # wood grain
        y = table_y + k * (height - table_y) // 5
        d.line([0, y, width, y + 3], fill=(128, 86, 50), width=2)
    d.rectangle([int(width * 0.72), int(height * 0.12), int(width * 0.92), int(height * 0.40)],
                fill=(250, 250, 235), outline=(90, 90, 90), width=2)  # a window
    cx = int(width * x_frac)
    s = height / 240.0
    d.ellipse([cx - 46 * s, table_y - 8 * s, cx + 46 * s, table_y + 10 * s], fill=(245, 245, 245),
              outline=(160, 160, 160))  # saucer
    top, bottom = table_y - 70 * s, table_y
    d.polygon([(cx - 32 * s, top), (cx + 32 * s, top), (cx + 24 * s, bottom), (cx - 24 * s, bottom)],
              fill=(200, 30, 40), outline=(120, 10, 20))  # cup body
    d.ellipse([cx - 32 * s, top - 7 * s, cx + 32 * s, top + 7 * s], fill=(90, 50, 30),
              outline=(120, 10, 20))  # coffee
    d.arc([cx + 18 * s, top + 12 * s, cx + 52 * s, top + 48 * s], start=-80, end=80, fill=(200, 30, 40),
          width=max(2, int(7 * s)))  # handle
    return img


def shapes_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 384), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.ellipse([40, 60, 180, 200], fill=(220, 40, 40))  # red circle
    d.rectangle([210, 60, 350, 200], fill=(40, 90, 220))  # blue square
    d.polygon([(430, 60), (500, 200), (360, 200)], fill=(40, 170, 70))  # green triangle
    d.rectangle([60, 250, 460, 330], fill=(250, 200, 30))  # yellow bar
    d.text((256, 290), "three shapes", fill=(0, 0, 0), font=_font(28), anchor="mm")
    return img


def sign_image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 320), (60, 120, 60))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([36, 40, 476, 250], radius=18, fill=(250, 250, 240), outline=(30, 30, 30), width=4)
    d.text((256, 100), "MING OMNI CAFE", fill=(150, 20, 20), font=_font(40), anchor="mm")
    d.text((256, 160), "Open 8:00 - 18:00", fill=(20, 20, 20), font=_font(30), anchor="mm")
    d.text((256, 210), "Tea 3 yuan", fill=(20, 20, 120), font=_font(30), anchor="mm")
    d.rectangle([246, 250, 266, 320], fill=(90, 60, 40))  # the post
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- video


def cup_positions(n: int) -> list[float]:
    """The cup slides from the left third to the right third and back (a loop without a jump)."""
    return [0.5 - 0.22 * math.cos(2 * math.pi * i / n) for i in range(n)]


def y4m_bytes() -> bytes:
    """An uncompressed YUV4MPEG2 clip (I420) as Chromium's file-backed fake camera reads it."""
    import cv2

    w, h = Y4M_SIZE
    out = [f"YUV4MPEG2 W{w} H{h} F{Y4M_FPS}:1 Ip A1:1 C420jpeg\n".encode("ascii")]
    for x in cup_positions(Y4M_FRAMES):
        rgb = np.asarray(cup_scene(w, h, x))
        out.append(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return b"".join(out)


def mp4_bytes() -> bytes:
    """A short H.264 clip of the cup scene (yuv420p, no audio, no timestamps in the metadata)."""
    import av

    w, h = CLIP_SIZE
    n = CLIP_FPS * CLIP_SECONDS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with av.open(str(path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=CLIP_FPS)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": "30", "preset": "medium", "threads": "1"}
            stream.codec_context.thread_count = 1
            for x in cup_positions(n):
                frame = av.VideoFrame.from_ndarray(np.asarray(cup_scene(w, h, x)), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()


# --------------------------------------------------------------------------- all


def build() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    speech = {}
    for name, voice, wpm, text in QUESTIONS:
        speech[name] = espeak(text, voice, wpm)
        files[f"speech/{name}"] = wav_bytes(speech[name], SAMPLE_RATE)
    files["audio/music_tones.wav"] = wav_bytes(music_tones(), SAMPLE_RATE)
    files["images/shapes.png"] = png_bytes(shapes_image())
    files["images/cup.png"] = png_bytes(cup_scene(512, 384, 0.45))
    files["images/sign.png"] = png_bytes(sign_image())
    files["video/cup_on_table.mp4"] = mp4_bytes()
    lead = np.zeros(int(MIC_LEAD_S * SAMPLE_RATE), np.float32)
    tail = np.zeros(int(MIC_TAIL_S * SAMPLE_RATE), np.float32)
    files["fake_capture/mic.wav"] = wav_bytes(np.concatenate([lead, speech[QUESTIONS[0][0]], tail]), SAMPLE_RATE)
    files["fake_capture/webcam.y4m"] = y4m_bytes()
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS, help="folder to write (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)
    files = build()
    differ = []
    for rel, data in sorted(files.items()):
        path = args.out / rel
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                differ.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{rel:32s} {len(data) / 1024:8.1f} KiB  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    if args.check:
        print("differ: " + ", ".join(differ) if differ else f"all {len(files)} files match")
        return 1 if differ else 0
    print(f"total {sum(map(len, files.values())) / 1024:.1f} KiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
