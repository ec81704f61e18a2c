"""Are mindglm's packages importable? Checked by the scripts before anything imports them, so a
Python without them prints one line naming the command that sets them up, not a traceback.

Standard library only (it runs before numpy, sentencepiece, yaml or MindSpore can be imported).
"""
from __future__ import annotations

import importlib.util
import os
import sys

# module name -> what to install (setup.py's install_requires)
REQUIRED = {"numpy": "numpy<2", "sentencepiece": "sentencepiece", "yaml": "pyyaml", "mindspore": "mindspore==2.10.0"}
SETUP_COMMAND = "make chat"  # creates .venv (about a minute), then starts the demo chat


def missing_packages(modules=REQUIRED) -> list:
    """What to install for the modules this Python cannot import."""
    return [package for module, package in modules.items() if importlib.util.find_spec(module) is None]


def require_packages(program: str, modules=REQUIRED, command: str = None) -> None:
    """Exit with status 2 and one line on stderr when a required package is missing.

    program: the script's path (`__file__`); command: how to run it, default `python <program>`.
    """
    missing = missing_packages(modules)
    if not missing:
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    program = os.path.relpath(os.path.abspath(program), repo)
    command = command or f"python {program}"
    name = command.split()[-1]
    sys.stderr.write(f"{name}: error: this Python ({sys.executable}) lacks {', '.join(missing)}: run "
                     f"`{SETUP_COMMAND}` in the repository (it sets up .venv and starts the demo chat), then "
                     f"use .venv/bin/{command}\n")
    raise SystemExit(2)
