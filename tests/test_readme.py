"""The README's two fresh-machine commands: the test command is what CI runs, the main one parses."""

import re
import shlex
from pathlib import Path

from mlx_compact.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks() -> list:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _two_commands() -> tuple:
    """The first two bash blocks of the README, each one line: (main job, test suite)."""
    main, test = (block.strip() for block in _bash_blocks()[:2])
    assert "\n" not in main and "\n" not in test
    return main, test


def _steps(command: str) -> list:
    return [shlex.split(step) for step in command.split("&&")]


def _ci_steps() -> list:
    """The shell steps of .ci/run, with pip's quiet flag dropped (it changes nothing but the log)."""
    steps = []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] in ("python3", "python", ".", "pip", "ruff"):
            steps.append([w for w in words if w != "-q"] if words[0] == "pip" else words)
    return steps


def test_test_command_is_what_ci_runs():
    _, test = _two_commands()
    ci, readme = _ci_steps(), _steps(test)
    positions = [ci.index(step) for step in readme]  # every README step is a CI step...
    assert positions == sorted(positions)  # ...in the same order
    assert ci[-1] == readme[-1] == ["python", "-m", "pytest", "-q"]  # and CI ends with the README's test run


def test_main_command_installs_and_runs_a_generate_that_parses():
    main, _ = _two_commands()
    steps = _steps(main)
    assert steps[:3] == [["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"], ["pip", "install", "-e", "."]]
    assert steps[3][:2] == ["mlx-compact", "generate"] and len(steps) == 4
    args = build_parser().parse_args(steps[3][1:])
    assert args.command == "generate" and args.prompt and args.model is None  # the bundled model
    assert args.image and all((ROOT / image).exists() for image in args.image)


def test_every_mlx_compact_command_in_the_readme_parses():
    lines = [line.split("| ")[-1].strip() for block in _bash_blocks() for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("mlx-compact ")]
    assert len(commands) >= 5
    for command in commands:
        build_parser().parse_args(shlex.split(command.split("&&")[-1])[1:])


def test_main_command_runs_on_the_bundled_model(capsys):
    """The README's main job, run in-process: the bundled model answers about the bundled image, offline."""
    from mlx_compact.cli import main as cli_main

    main, _ = _two_commands()
    argv = _steps(main)[3][1:]
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "TTFT" in out.err
