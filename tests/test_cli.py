"""The command line: every listed command has help that documents its flags."""

import re
import subprocess
import sys

import pytest

from warmstart.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_documents_every_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = text.split("options:", 1)[1]
    # each option line either has help text after it or its help starts on the next line
    entries = re.split(r"\n  (?=-)", options)
    undocumented = [e.split()[0] for e in entries[1:] if len(e.split()) < 3]
    assert not undocumented, undocumented


def test_top_level_help_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "warmstart", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    for missing in ("finetune", "predict", "export", "bench"):
        assert missing not in out
