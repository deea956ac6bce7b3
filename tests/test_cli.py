"""The command line: every registered command has help that documents every option."""

import argparse
import re
import subprocess
import sys

import pytest

from warmstart.cli import COMMANDS, build_parser, main

PLANNED = ("finetune", "predict", "export", "bench")


def undocumented(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Names of the arguments of `parser` (and of any nested subcommands) without real help text.

    Help that is missing, empty, hidden (SUPPRESS) or nothing but a '(default: …)' suffix counts as missing.
    Reads parser._actions, not the rendered help: the rendered text of a flag with a short alias and no help
    (`-x XX, --xx XX`) looks like a flag followed by words, which is how the previous check let one through."""
    missing = []
    for action in parser._actions:
        name = prefix + ("/".join(action.option_strings) or action.metavar or action.dest)
        if isinstance(action, argparse._SubParsersAction):
            shown = {a.dest: a.help for a in action._choices_actions}  # the one-line help in the command list
            for sub_name, sub in action.choices.items():
                if not _has_words(shown.get(sub_name)):
                    missing.append(f"{prefix}{sub_name} (command)")
                missing += undocumented(sub, f"{prefix}{sub_name} ")
            continue
        if not _has_words(action.help):
            missing.append(name)
    return missing


def _has_words(text) -> bool:
    if text is None or text is argparse.SUPPRESS:
        return False
    text = re.sub(r"\(default: [^)]*\)|%\(default\)s", "", str(text))
    return re.search(r"[A-Za-z]{2,}", text) is not None


def command_parser(name: str) -> argparse.ArgumentParser:
    """The fully built parser of one subcommand, as `warmstart NAME ...` builds it."""
    parser = build_parser([name])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_the_check_flags_undocumented_options():
    # The check itself can fail: a flag with a short alias and no help (what the old rendered-text check
    # accepted), an empty help, a default-only help, a hidden flag and an undocumented positional are all caught.
    p = argparse.ArgumentParser()
    p.add_argument("-x", "--xx")
    p.add_argument("--empty", help="")
    p.add_argument("--only-default", default=3, help=" (default: 3)")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    p.add_argument("--fine", help="a documented flag")
    p.add_argument("pos")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("nohelp").add_argument("-y", "--yy")
    assert undocumented(p) == ["-x/--xx", "--empty", "--only-default", "--hidden", "pos", "nohelp (command)",
                               "nohelp -y/--yy"]
    ok = argparse.ArgumentParser()
    ok.add_argument("-x", "--xx", help="documented")
    assert undocumented(ok) == []


@pytest.mark.parametrize("command", sorted(COMMANDS))  # whatever is registered when the suite runs
def test_every_option_of_every_command_has_help(command):
    parser = command_parser(command)
    assert len(parser._actions) > 1, f"{command} registers no options"  # its module's add_arguments ran
    assert not undocumented(parser), f"warmstart {command}: options without help: {undocumented(parser)}"
    assert _has_words(COMMANDS[command][1]), f"{command} has no one-line help in cli.COMMANDS"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_renders(command, capsys):
    # a help string with a bare '%' or a bad %(name)s only breaks when --help formats it
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "options:" in capsys.readouterr().out


def test_top_level_help_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "warmstart", "--help"], capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^ {4}(\w+)", out, flags=re.M))
    assert listed == set(COMMANDS), out
    assert not undocumented(build_parser([])), undocumented(build_parser([]))  # --version, the command list
    for missing in set(PLANNED) - set(COMMANDS):  # a planned command appears once it is registered
        assert missing not in out
