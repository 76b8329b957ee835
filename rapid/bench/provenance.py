"""What a benchmark JSON says about how it was made: the command as typed (it pastes and runs again from `cwd`), and
the versions of the code and its stack."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def command_line(args) -> str:
    """The command that made `args`: `rapid ...` as typed (rapid.entrypoints.cli records it), else this process's."""
    return getattr(args, "command_line", None) or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def provenance(args) -> dict:
    """{'command', 'cwd', 'args', 'versions'}: `args` every setting as parsed (defaults resolved); the versions of
    rapid, its git commit (and whether the tree had changes) where it runs from a checkout, Python, torch, triton."""
    versions = {"rapid": _rapid_version(), "python": platform.python_version()}
    for name in ("torch", "triton"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        versions[name] = getattr(module, "__version__", "unknown")
    versions.update(_git_state(Path(__file__).resolve().parents[2]))
    settings = {k: v if v is None or isinstance(v, (bool, int, float, str, list)) else str(v)
                for k, v in sorted(vars(args).items()) if k not in ("func", "cmd", "bench_cmd", "command_line")}
    return {"command": command_line(args), "cwd": os.getcwd(), "args": settings, "versions": versions}


def _rapid_version() -> str:
    from rapid.entrypoints.version import version

    return version()


def _git_state(root: Path) -> dict:
    """{'git_commit', 'git_dirty'} of the checkout at `root`; {} where there is none (an installed wheel)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
