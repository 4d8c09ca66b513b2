"""What every command line that loads a model does with a checkpoint it cannot load: one 'error:' line naming the
model and why, an exit code, and no output file."""

from __future__ import annotations

from pathlib import Path

OTHER_MODELS_CONFIG = '{"model_type": "qwen2"}'  # a config.json of another model (not Ming's)


def check_unloadable_checkpoint(main, folder: Path, capsys, args: list[str], code: int, out: Path | None = None) -> None:
    """`main(["--model", folder, *args])` on a folder holding another model's config.json returns `code`, says
    why on stderr in one line (no traceback) and writes no `out`."""
    (folder / "config.json").write_text(OTHER_MODELS_CONFIG)
    assert main(["--model", str(folder), *args]) == code
    err = capsys.readouterr().err
    assert f"error: could not load the model {str(folder)!r}: {folder / 'config.json'}: neither a Ming" in err, err
    assert out is None or not out.exists()
