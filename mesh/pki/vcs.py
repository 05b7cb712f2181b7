"""Keeping the CA's keys out of git: a state dir inside a git work tree gets a `.gitignore` for the keys when the
CA is made, and `key_in_git` tells `mesh ca show` when a key sits in a work tree without being ignored.
It must not read keys; it only looks at paths (and asks git, when it is installed, what it ignores).
"""

from __future__ import annotations

import os
import shutil
import subprocess

GITIGNORE = ".gitignore"
# Paths relative to the state dir: the CA's private keys, and the temp folder a CA is built in.
IGNORED = ("/ca/*.key", "/ca/**/*.key", "/.ca-*/")  # ** : next/ and archive/ of a rotation
HEADER = "# written by mesh with the CA: its private keys never belong in git"


def git_work_tree(path: str) -> str | None:
    """The top of the git work tree holding path (a `.git` folder or file in it or above), or None."""
    current = os.path.abspath(path)
    while True:
        if os.path.exists(os.path.join(current, ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def protect_keys(state_dir: str) -> bool:
    """When state_dir is in a git work tree, make sure its .gitignore ignores the CA's keys; True if written."""
    if git_work_tree(state_dir) is None:
        return False
    path = os.path.join(state_dir, GITIGNORE)
    try:
        with open(path, encoding="utf-8") as handle:
            present = handle.read()
    except FileNotFoundError:
        present = ""
    lines = set(present.splitlines())
    missing = [pattern for pattern in IGNORED if pattern not in lines]
    if not missing:
        return False
    text = present + ("\n" if present and not present.endswith("\n") else "")
    text += "\n".join([HEADER, *missing]) + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return True


def key_in_git(key_path: str) -> bool:
    """Whether key_path is inside a git work tree and git would track it (not ignored, or already committed).
    Without git installed, any key inside a work tree counts."""
    top = git_work_tree(os.path.dirname(key_path))
    if top is None:
        return False
    git = shutil.which("git")
    if git is None:
        return True
    done = subprocess.run([git, "-C", top, "check-ignore", "-q", os.path.abspath(key_path)],
                          capture_output=True, check=False, timeout=30)
    return done.returncode != 0  # 0: ignored (and not tracked); 1: not ignored; 128: git could not tell
