"""Every path written into a generated file goes through one function (`p2p_local.files.quoted`): shell lines
(the hook, a README's commands) get it quoted so the shell reads it back byte for byte; a Modelfile refuses a
path that would break its line (a newline in `--to` became a directive of its own)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from p2p_local.errors import UsageError
from p2p_local.files import quoted

HOSTILE_PATHS = ["/tmp/a b", "/tmp/it's", "/tmp/$(touch pwned)", "/tmp/`id`", "/tmp/a\nFROM evil", "/tmp/;rm -rf x",
                 "/tmp/ünïcode", "-rf"]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_a_quoted_path_reads_back_in_the_shell(path: str, tmp_path: Path) -> None:
    out = subprocess.run(["sh", "-c", f"printf %s {quoted(path)}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout == path and not (tmp_path / "pwned").exists()


def test_a_modelfile_refuses_a_path_with_a_line_break() -> None:
    assert quoted("/data/me.gguf", "modelfile") == "/data/me.gguf"
    for bad in ("/tmp/a\nFROM evil", "/tmp/a\rb", "/tmp/\x1b[2J"):
        with pytest.raises(UsageError, match="Modelfile"):
            quoted(bad, "modelfile")


def test_export_to_a_folder_with_a_newline_writes_nothing(session, tmp_path: Path) -> None:
    from p2p_local.adapter_export import export_adapter

    to = tmp_path / "out\nADAPTER /etc/passwd"
    with pytest.raises(UsageError, match="Modelfile"):
        export_adapter(session, "demo", to, task="movielens-rating")
    assert not to.exists()  # checked before anything is written
    ok = export_adapter(session, "demo", tmp_path / "out ok", task="movielens-rating")
    modelfile = ok.path.with_suffix(".Modelfile").read_text()
    assert modelfile.splitlines()[1] == f"ADAPTER {ok.path}"
