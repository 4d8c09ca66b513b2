"""`python -m engine.parity`'s command line (the cases themselves: tests/tools/test_parity.py)."""

import pytest


def test_a_case_path_that_is_no_folder_is_a_usage_error_not_a_parity_failure(tmp_path, capsys):
    """A mistyped case path printed a table row 'FAIL (no meta.json ...)' and exit 1, the code of a parity failure;
    it is refused before any case runs: exit 2 naming each such path."""
    from engine.tools.parity import main

    (tmp_path / "a_file").write_text("not a case")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "no_such_case"), str(tmp_path / "a_file")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(tmp_path / "no_such_case") in err and str(tmp_path / "a_file") in err
