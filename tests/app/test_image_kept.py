"""The Image tab's request kept in the browser across a reload (app/ui/image.py): its pictures and mask come back or are
named, and what an earlier studio kept under older keys is carried over once or said unreadable. Plain functions, no
page (the page's own JS is in tests/app/test_tabs_browser.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from app.ui.image import (KEPT_GALLERY_KEY, MASK, NOT_KEPT, REFERENCES, REQUEST_BEFORE_KEY, REQUEST_KEY,  # noqa: E402
                          RESULTS_BEFORE_KEY, carry_over, kept_image_request, restored_files)


def test_the_kept_request_gives_back_its_pictures_and_mask_or_names_those_gone(tmp_path):
    ref, mask = tmp_path / "cup.png", tmp_path / "where.png"
    ref.write_bytes(b"picture"), mask.write_bytes(b"mask")
    kept = json.loads(json.dumps(kept_image_request("Edit", "make it blue", "", [str(ref)], {"path": str(mask)})))
    refs, back, said = restored_files(kept)
    assert [Path(p).read_bytes() for p in refs] == [b"picture"] and Path(back).read_bytes() == b"mask"
    assert said is None and Path(refs[0]).name == "cup.png"
    Path(kept[MASK]).unlink()  # the machine cleaned its temp folder
    refs, back, said = restored_files(kept)
    assert len(refs) == 1 and back is None and "'where.png' did not come back" in said and "give it again" in said
    assert restored_files({**kept, NOT_KEPT: ["big.png"]})[2].startswith("'big.png', 'where.png' did not come back")
    # a path the browser gives that this studio did not save is not opened
    assert restored_files({REFERENCES: [str(ref)]})[0] == [] and "'cup.png'" in restored_files({REFERENCES: [str(ref)]})[2]
    assert restored_files({"prompt": "a cup"})[:2] == (gr.skip(), gr.skip())


def test_an_earlier_studios_request_is_carried_over_once_and_its_unreadable_gallery_said():
    before = {"mode": "Generate", "prompt": "a cup", "target": "", "done": False}
    found = [REQUEST_BEFORE_KEY, RESULTS_BEFORE_KEY]
    results, request, writes, said = carry_over(found, before, None, [], {})
    assert request == before and json.loads(writes["write"][REQUEST_KEY]) == before
    assert writes["remove"] == found and KEPT_GALLERY_KEY not in writes["write"]
    assert "results gallery kept in this browser by an earlier version" in said and "was removed" in said
    # this studio's newer request stays; a readable gallery joins this studio's, after it
    mine = {"mode": "Edit", "prompt": "newer"}
    entry, old = {"image": "/tmp/a.png", "settings": {}}, {"image": "/tmp/b.png", "settings": {}}
    results, request, writes, said = carry_over(found, before, [old], [entry], mine)
    assert request == mine and results == [entry, old] and said is None
    assert json.loads(writes["write"][KEPT_GALLERY_KEY]) == [entry, old] and REQUEST_KEY not in writes["write"]
    assert carry_over([], None, None, [entry], mine) == ([entry], mine, {"write": {}, "remove": []}, None)
