"""A bundle is a closed world: every file name a manifest (or a graph) gives must stay inside the bundle.

``bundle_member`` is the one check: a plain relative name (no absolute path, drive, ``..``, NUL or backslash), and
the real path it resolves to (symlinks followed) lies inside the bundle's real path. Everything that opens,
stats, hashes or copies a file on a manifest's say goes through it. Runs on Python 3.8; standard library only.
"""
import os
from typing import Any

from runtime.errors import BundleError

MAX_NAME_CHARS = 255


def check_member_name(name: Any, field: str, where: str) -> str:
    """``name`` when it is a plain relative file name inside a bundle; BundleError naming ``field`` otherwise."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: {field} must be a non-empty file name, got {name!r:.80}")
    bad = None
    if len(name) > MAX_NAME_CHARS:
        bad = f"longer than {MAX_NAME_CHARS} characters"
    elif "\0" in name or "\\" in name or ":" in name:
        bad = "contains NUL, '\\' or ':'"
    elif os.path.isabs(name) or name.startswith(("/", "~")):
        bad = "is an absolute path"
    elif any(part in ("..", ".", "") for part in name.split("/")):
        bad = "has '..', '.' or empty path parts"
    if bad is not None:
        raise BundleError(f"{where}: {field} {name!r:.80} {bad}; a bundle may only name files inside itself")
    return name


def bundle_member(bundle_dir: str, name: Any, field: str, where: str = "") -> str:
    """The path of bundle file ``name``, checked to stay inside ``bundle_dir`` after resolving symlinks."""
    where = where or os.path.join(bundle_dir, "manifest.json")
    check_member_name(name, field, where)
    root = os.path.realpath(bundle_dir)
    path = os.path.join(bundle_dir, name)
    real = os.path.realpath(path)
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise BundleError(f"{where}: {field} {name!r} resolves outside the bundle ({real}); a bundle may only "
                          "name files inside itself")
    return path
