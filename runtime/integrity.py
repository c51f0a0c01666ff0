"""Checking a bundle's files against the sha256 digests its manifest records, hashing each file once.

A verified stamp remembers, per file, the digest that was checked and the file's (size, mtime_ns, ctime_ns, inode)
when it was hashed. At the next load a file whose stat still matches and whose manifest digest is the stamped one
is not hashed again, so a 12 GB bundle is hashed once rather than at every load. A stamp never makes a mismatch
pass: entries are written only after a digest matched, and any change to the file's stat or to the manifest's
digest hashes it again. The stamp lives in the bundle (``.glm-export-verified.json``) when the bundle is
writable, else in the user's cache directory, keyed by the bundle's real path. Standard library only; Python 3.8.
"""
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, Mapping, Optional

from runtime.bundle_paths import bundle_member
from runtime.errors import BundleError

log = logging.getLogger("glm_export")

STAMP_NAME = ".glm-export-verified.json"
STAMP_FORMAT = "glm-export-verified-1"
_MAX_STAMP_BYTES = 1 << 20


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _stat_key(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _cache_stamp_path(bundle_dir: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.realpath(bundle_dir).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(base, "glm-export", "verified", key + ".json")


def _stamp_paths(bundle_dir: str):
    return [os.path.join(bundle_dir, STAMP_NAME), _cache_stamp_path(bundle_dir)]


def _read_stamp(bundle_dir: str) -> Dict[str, Any]:
    """The stamped entries (file name -> {"sha256", "stat"}), from the first stamp that reads; {} when none does.
    A stamp that is unreadable or malformed is ignored (the files are simply hashed again)."""
    for path in _stamp_paths(bundle_dir):
        try:
            if os.path.getsize(path) > _MAX_STAMP_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("format") == STAMP_FORMAT and isinstance(data.get("files"), dict):
            if data.get("bundle") == os.path.realpath(bundle_dir):
                return data["files"]
    return {}


def _write_stamp(bundle_dir: str, files: Mapping[str, Any]) -> Optional[str]:
    """Write the stamp atomically into the bundle, else into the user cache; None when neither is writable."""
    body = json.dumps({"format": STAMP_FORMAT, "bundle": os.path.realpath(bundle_dir), "files": dict(files)})
    for path in _stamp_paths(bundle_dir):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(body)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return path
        except OSError:
            continue
    return None


def verify_files(bundle_dir: str, files: Mapping[str, Mapping[str, Any]], use_stamp: bool = True,
                 where: str = "") -> int:
    """Check every manifest-listed file's sha256; BundleError naming the file and both digests on a mismatch.

    Returns the number of bytes hashed (0 when the stamp covered everything). ``use_stamp`` False hashes every
    file (and refreshes the stamp).
    """
    stamped = _read_stamp(bundle_dir) if use_stamp else {}
    fresh: Dict[str, Any] = {}
    hashed = 0
    for name, rec in files.items():
        want = rec.get("sha256") if isinstance(rec, Mapping) else None
        if not isinstance(want, str):
            continue  # the manifest check has refused records of the wrong type already; no digest, nothing to do
        path = bundle_member(bundle_dir, name, "files entry", where)
        try:
            key = _stat_key(path)
        except OSError as e:
            raise BundleError(f"{path}: cannot read it ({e.strerror or e})") from None
        entry = stamped.get(name)
        if isinstance(entry, dict) and entry.get("sha256") == want and entry.get("stat") == key:
            fresh[name] = entry
            continue
        try:
            got = sha256_file(path)
        except OSError as e:
            raise BundleError(f"{path}: cannot read it ({e.strerror or e})") from None
        hashed += key[0]
        if got != want:
            raise BundleError(f"{path}: checksum mismatch: sha256 {got}, the manifest records {want}; the bundle is "
                              "corrupt (re-export it; --no-verify-files loads it anyway)")
        fresh[name] = {"sha256": want, "stat": key}
    if hashed or fresh != stamped:
        where_stamp = _write_stamp(bundle_dir, fresh)
        if where_stamp is None:
            log.info("could not record verified checksums for %s (nowhere writable)", bundle_dir)
    return hashed
