"""Every `fmn` command the README gives for the embedded model runs, with small counts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from forget_me_not.cli.main import main

README = Path(__file__).parents[1] / "README.md"
SMALL = {  # what each command gets added so the whole README runs in a minute
    "forget": ["--steps", "2"],
    "bench": ["--n", "1", "--budget", "1", "--concepts", "star,circle"],
    "generate": ["--n", "1", "--steps", "2"],
    "attack": ["--n", "1", "--steps", "2", "--budget", "2"],
}
LONG_RUNNING = {"serve"}  # covered by tests/test_serve.py


def embedded_commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("fmn "):
                continue
            argv = shlex.split(line)[1:]
            if "--model" in argv or argv[0] in LONG_RUNNING:
                continue  # a real model's folder, or the server
            out.append(argv)
    return out


def test_the_readme_has_embedded_commands():
    assert {a[0] for a in embedded_commands()} >= {"forget", "bench", "generate"}


def test_every_embedded_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in embedded_commands():
        closed_form = "--method" in argv and argv[argv.index("--method") + 1] == "uce"
        code = main([*argv, *([] if closed_form else SMALL.get(argv[0], []))])
        assert code == 0, (argv, capsys.readouterr().err)
