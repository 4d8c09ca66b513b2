"""Speech, sound and music from the command line:

  python -m engine.tts --model DIR --text "..." [--voice NAME | --ref ref.wav [--ref-text ...]]
                       [--instruct dialect=...,emotion=...] [--task tts|sound|music|podcast] --out out.wav

Streams the audio into a PCM16 WAV at the model's true rate and prints the time to the first chunk
and the real-time factor. Without --model the tiny demo checkpoint is used (random weights: noise).
Voice library: --save-voice NAME (with --ref), --list-voices, --delete-voice NAME.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.command import EXIT_CODES_HELP, output_file_problem, text_argument
from engine.errors import EXIT_INPUT, LOAD_ERRORS, MingError, error_exit_code, load_failure
from engine.events import AudioChunk, Done, Error
from engine.models.talker.audio import WavWriter


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine.tts", description=__doc__.splitlines()[0],
                                 epilog=EXIT_CODES_HELP)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the tiny demo)")
    ap.add_argument("--text", default="", help="what to say / the sound or music description ('-': read it from stdin)")
    ap.add_argument("--task", default="tts", choices=["tts", "sound", "music", "podcast"])
    ap.add_argument("--voice", default=None, help="a saved voice name (see --list-voices)")
    ap.add_argument("--ref", action="append", default=None, help="reference clip to clone (repeat for podcast)")
    ap.add_argument("--ref-text", default=None, help="transcript of --ref (default: our ASR transcribes it)")
    ap.add_argument("--instruct", default=None,
                    help="key=value,... of dialect, emotion, speed, pitch, volume, ip, style, bgm.Genre, bgm.SNR ...")
    ap.add_argument("--music", default=None, help="genre=...,mood=...,instrument=...,theme=...,duration=30")
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--sigma", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="output WAV file, written as OUT.partial while it streams and renamed to OUT at the end (an "
                         "existing file of that name is replaced then; a run refused or stopped before any sound leaves "
                         "it as it was)")
    ap.add_argument("--save-voice", default=None, metavar="NAME", help="clone --ref and save it under NAME")
    ap.add_argument("--list-voices", action="store_true")
    ap.add_argument("--delete-voice", default=None, metavar="NAME")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="weight and activation dtype (default: bf16 on GPU, fp32 on CPU where the model fits)")
    return ap


def _music(spec: str | None) -> dict | None:
    """'genre=...,duration=30' (or '30s', as the music prompt writes it) -> the music dict; ValueError
    naming a duration that is no number of seconds."""
    if not spec:
        return None
    out: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key == "duration":
            try:
                value = float(value.removesuffix("s"))
            except ValueError:
                raise ValueError(f"--music duration must be a number of seconds (e.g. 30 or 30s), got {value!r}") from None
        out[key] = value
    return out


def _flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags themselves, said before the model loads (each was said after it, or was a
    traceback): --save-voice without one clip, an --out that cannot be written, a missing --out, a saved voice and a
    clip together."""
    if args.save_voice and (not args.ref or len(args.ref) != 1):
        return "--save-voice needs one --ref clip"
    manages_voices = args.list_voices or args.delete_voice or args.save_voice
    if args.out is None:
        return None if manages_voices else "--out is required (the WAV file to write)"
    out_problem = output_file_problem(args.out)
    if out_problem:
        return f"--out {args.out}: {out_problem}"
    if args.voice and args.ref:
        return "--voice (a saved voice) and --ref (a clip to clone) exclude each other: give one"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.text = text_argument(parser, "--text", args.text)
    try:
        music = _music(args.music)
    except ValueError as e:
        parser.error(str(e))  # before the model loads: exit status 2 with the usage line
    if _flag_problem(args):
        parser.error(_flag_problem(args))
    from engine.runtime import Engine  # noqa: PLC0415  (torch import only when running)
    try:
        engine = Engine.load(args.model, dtype=args.dtype, device=args.device)
    except LOAD_ERRORS as e:
        print(load_failure(args.model, e), file=sys.stderr)
        return EXIT_INPUT
    if not engine.has_talker:  # a checkpoint without a (loadable) talker: the model given cannot speak
        print(f"error: {engine.talker_error}", file=sys.stderr)
        return EXIT_INPUT
    try:
        if args.list_voices:
            voices = engine.list_voices()
            for v in voices:
                print(f"{v.name}\t{v.seconds:.1f} s\t{v.ref_text or ''}")
            if not voices:
                print("no saved voices (save one with --save-voice NAME --ref CLIP)", file=sys.stderr)
            return 0
        if args.delete_voice:
            engine.delete_voice(args.delete_voice)
            print(f"deleted voice {args.delete_voice!r}")
            return 0
        if args.save_voice:
            info = engine.save_voice(args.save_voice, args.ref[0], args.ref_text, seed=args.seed)
            print(f"saved voice {info.name!r} ({info.seconds:.1f} s, transcript: {info.ref_text!r})")
            if info.warning:
                print(f"warning: {info.warning}", file=sys.stderr)
            if not args.out:
                return 0
    except MingError as e:  # an unknown voice, an unreadable reference clip
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    ref = args.ref if args.ref is None or len(args.ref) > 1 else args.ref[0]
    if args.save_voice:
        ref, voice = None, args.save_voice
    else:
        voice = args.voice
    t0 = time.perf_counter()
    first, finished = None, False
    partial = args.out.with_name(args.out.name + ".partial")  # the file stays whole until the speech has sound
    try:
        writer = WavWriter(partial, engine.talker.sample_rate)
    except OSError as e:  # no permission, a full disk
        print(f"error: cannot write {args.out} ({e.strerror or e})", file=sys.stderr)
        return EXIT_INPUT
    try:
        for ev in engine.speak(args.text, voice=voice, ref_audio=ref, ref_text=args.ref_text, instruct=args.instruct,
                               task=args.task, cfg=args.cfg, sigma=args.sigma, temperature=args.temperature,
                               seed=args.seed, max_seconds=args.max_seconds, music=music):
            if isinstance(ev, AudioChunk):
                if first is None:
                    first = time.perf_counter() - t0
                    print(f"first chunk after {first * 1000:.0f} ms", flush=True)
                writer.write(ev.pcm)
            elif isinstance(ev, Error):
                print(f"error: {ev.message}", file=sys.stderr)
                return error_exit_code(ev.code)
            elif isinstance(ev, Done):
                finished = True
                s = ev.stats
                if (ev.result or {}).get("ref_text_from_asr") is not None:
                    print(f"reference transcript (from our ASR): {ev.result['ref_text_from_asr']!r}")
                if (ev.result or {}).get("reference_warning"):
                    print(f"warning: {ev.result['reference_warning']}", file=sys.stderr)
                print(f"{s.audio_seconds:.2f} s of audio at {engine.talker.sample_rate} Hz -> {args.out}; "
                      f"time to first chunk {s.time_to_first_audio_s * 1000:.0f} ms, "
                      f"real-time factor {s.audio_real_time_factor:.3f} ({ev.finish_reason})")
    finally:
        writer.close()
        if finished or first is not None:  # (stopped after a sound: what was spoken is kept)
            partial.replace(args.out)
        else:  # refused or stopped before a sound: no empty WAV, and a file of that name is left as it was
            partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    from engine.command import run_command

    sys.exit(run_command(main))
