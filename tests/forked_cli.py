"""Run `privdpo ...` command lines as the console script would, each in a process forked
from this one after it has imported privdpo and its libraries once: a fresh interpreter
spends about 5 of a tiny command's 10 s on 2 cores importing torch and transformers.

    python tests/forked_cli.py CWD TIMEOUT < commands   (one command line per line)

Each command runs in a child that changes to CWD, parses the line like a shell (`shlex`)
and calls `privdpo.cli.main` with stdout and stderr sent to files, then leaves through the
interpreter's normal exit (threads joined, exit handlers run). This process prints one
JSON line per command: {"command", "returncode", "stdout", "stderr"}, and stops after the
first that fails or runs past TIMEOUT seconds."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback


def preload() -> None:
    """Import every privdpo module (those whose optional libraries are missing are left
    to the child, which fails on them as the console script would)."""
    import privdpo

    for module in pkgutil.walk_packages(privdpo.__path__, "privdpo."):
        if module.name.endswith("__main__"):  # `python -m privdpo`: runs the CLI
            continue
        try:
            importlib.import_module(module.name)
        except Exception:  # noqa: BLE001 - left to the command itself
            pass


def child(argv: list[str], cwd: str, out: str, err: str) -> None:
    """Run one command (its words, `privdpo` first) here, the forked child, and exit with
    its status."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = argv
    from privdpo.cli import main

    try:
        code = main(argv[1:])
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    except BaseException:  # noqa: BLE001 - what the console script would print
        traceback.print_exc()
        code = 1
    sys.exit(code)


def wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGKILL
        time.sleep(0.05)


def run_all(commands: list[str], cwd: str, timeout: float) -> None:
    preload()
    scratch, parent = tempfile.mkdtemp(prefix="forked-cli-"), os.getpid()
    try:
        for i, command in enumerate(commands):
            code = run_one(command, cwd, timeout, os.path.join(scratch, str(i)))
            if code != 0:
                break
    finally:  # a child's exit passes through here too: only this process cleans up
        if os.getpid() == parent:
            shutil.rmtree(scratch)


def run_one(command: str, cwd: str, timeout: float, stem: str) -> int:
    """Fork, run `command` in the child, print its JSON line; its exit status."""
    argv = shlex.split(command)
    if argv[0] != "privdpo":
        raise SystemExit(f"not a privdpo command: {command}")
    out, err = stem + ".out", stem + ".err"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(argv, cwd, out, err)  # never returns
    code = wait(pid, timeout)
    texts = []
    for path in (out, err):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    if code == -signal.SIGKILL:
        texts[1] += f"\n(killed after {timeout} s)"
    line = {"command": command, "returncode": code, "stdout": texts[0], "stderr": texts[1]}
    print(json.dumps(line), flush=True)
    return code


if __name__ == "__main__":
    run_all([line.strip() for line in sys.stdin if line.strip()], sys.argv[1], float(sys.argv[2]))
