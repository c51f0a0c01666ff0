"""Copy the tensorrt-stubs package into a directory for MYPYPATH, fixing what keeps mypy from parsing it.

tensorrt-stubs 10.13.0.35.1 (generated from the pybind11 bindings) has two syntax defects, plus two things mypy
1.x rejects or cannot resolve:

1. parameters named ``in`` (a Python keyword), e.g. ``IPluginV2DynamicExt.get_workspace_size(self, in: ...)``:
   renamed to ``in_``;
2. a parameter without a default after ones with defaults: ``INetworkDefinition.add_scale_nd(self, input, mode,
   shift=None, scale=None, power=None, channel_axis: int)``: a bare ``*`` is inserted before the first such
   parameter, which makes the rest keyword-only (valid syntax; callers pass ``channel_axis=`` by keyword);
3. ``...`` written as a type where the generator could not name one (``def get_flag(self, flag: ...)``,
   ``def get_error(self, index: int) -> ...``), which mypy 1.x refuses ("Ellipses cannot accompany other argument
   types"): replaced by ``typing.Any``;
4. a module-level ``bool: DataType`` (TensorRT's ``trt.bool`` data type) shadows the builtin, so every ``-> bool``
   in that module is an invalid type to mypy (and silently Any): those annotations are spelled ``builtins.bool``;
5. ``import tensorrt_libs`` names a runtime-only package that has no stubs: an empty ``tensorrt_libs`` stub is added.

mypy still reports other errors inside the stubs (undefined names such as ``capsule``, unannotated helpers); the
mypy configuration ignores errors in the stub modules and checks only how our code uses them.

Usage: patch_trt_stubs.py SOURCE_SITE_DIR DEST_DIR. SOURCE holds the installed ``tensorrt``/``tensorrt_bindings``
stub packages (``pip install --no-deps --target SOURCE tensorrt-stubs==...``); DEST is emptied and rewritten, so the
script can run any number of times. It fails when a defect it expects is not found (the stubs changed: check the
fixes still apply) or when a patched file still does not parse.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import sys
from typing import List, Tuple

PACKAGES = ("tensorrt", "tensorrt_bindings")
DEF_START = re.compile(r"^(\s*def \w+\()")


def split_params(text: str) -> List[str]:
    """Split a parameter list on its top-level commas (brackets, parentheses and quotes respected)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _closing_paren(line: str, open_at: int) -> int:
    depth, quote = 0, ""
    for i in range(open_at, len(line)):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
    return -1


BOOL_SHADOW = re.compile(r"^bool\s*:", re.M)
BOOL_WORD = re.compile(r"(?<!['\"\w.])bool(?!['\"\w])")
ELLIPSIS_TYPE = re.compile(r"^(\*{0,2}\w+)\s*:\s*\.\.\.(\s*=.*)?$")
ELLIPSIS_RETURN = re.compile(r"^\)\s*->\s*\.\.\.\s*:")


def fix_def_line(line: str) -> Tuple[str, int, int, int]:
    """The line fixed, and how many ``in`` renames, keyword-only markers and ``...`` types it took."""
    m = DEF_START.match(line)
    if not m:
        return line, 0, 0, 0
    open_at = m.end() - 1
    close_at = _closing_paren(line, open_at)
    if close_at < 0:
        return line, 0, 0, 0
    params = split_params(line[open_at + 1 : close_at])
    renamed = anys = 0
    for i, p in enumerate(params):
        if re.match(r"^in\s*(:|=|$)", p):
            params[i] = p = "in_" + p[2:]
            renamed += 1
        e = ELLIPSIS_TYPE.match(p)
        if e:
            params[i] = f"{e.group(1)}: typing.Any{e.group(2) or ''}"
            anys += 1
    tail = line[close_at:]
    if ELLIPSIS_RETURN.match(tail):
        tail = ELLIPSIS_RETURN.sub(") -> typing.Any:", tail, count=1)
        anys += 1
    starred, seen_default, marked = False, False, 0
    for i, p in enumerate(list(params)):
        if p.startswith("*"):
            starred = True
            continue
        if p == "/":
            continue
        if "=" in p:
            seen_default = True
        elif seen_default and not starred:
            params.insert(i, "*")
            starred, marked = True, 1
    if not renamed and not marked and not anys:
        return line, 0, 0, 0
    return line[: open_at + 1] + ", ".join(params) + tail, renamed, marked, anys


def patch(src_site: str, dest: str) -> Tuple[int, int, int]:
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    renamed = marked = anys = 0
    for pkg in PACKAGES:
        src = os.path.join(src_site, pkg)
        if not os.path.isdir(src):
            raise SystemExit(f"{src}: not found; is tensorrt-stubs installed into {src_site}?")
        shutil.copytree(src, os.path.join(dest, pkg))
    for pkg in PACKAGES:
        for root, _, files in os.walk(os.path.join(dest, pkg)):
            for name in files:
                if not name.endswith(".pyi"):
                    continue
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    lines = f.read().split("\n")
                out = []
                for line in lines:
                    fixed, r, k, a = fix_def_line(line)
                    renamed, marked, anys = renamed + r, marked + k, anys + a
                    out.append(fixed)
                text = "\n".join(out)
                if BOOL_SHADOW.search(text) and re.search(r"(->|:)\s*bool\b", text):
                    body = [ln if BOOL_SHADOW.match(ln) else BOOL_WORD.sub("builtins.bool", ln) for ln in out]
                    text = "import builtins\n" + "\n".join(body)
                    if text.count("from __future__") and not text.startswith("from __future__"):
                        text = _hoist_future(text)
                try:
                    ast.parse(text, filename=path, feature_version=(3, 8))
                except SyntaxError as e:
                    raise SystemExit(f"{path}:{e.lineno}: still not valid Python after patching: {e.msg}")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    libs = os.path.join(dest, "tensorrt_libs")
    os.makedirs(libs)
    with open(os.path.join(libs, "__init__.pyi"), "w", encoding="utf-8") as f:
        f.write("# runtime-only package of the tensorrt wheels (shared libraries); nothing to type\n")
    return renamed, marked, anys


def _hoist_future(text: str) -> str:
    """Keep ``from __future__`` imports first, as Python requires."""
    lines = text.split("\n")
    future = [ln for ln in lines if ln.startswith("from __future__")]
    rest = [ln for ln in lines if not ln.startswith("from __future__")]
    return "\n".join(future + rest)


def main(argv: List[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
        return 2
    renamed, marked, anys = patch(argv[1], argv[2])
    if not renamed or not marked:
        print(
            f"expected defects not found (in-renames: {renamed}, keyword-only markers: {marked}); the stubs changed, "
            f"check that .ci/patch_trt_stubs.py still does what is needed",
            file=sys.stderr,
        )
        return 1
    print(f"patched tensorrt stubs into {argv[2]}: {renamed} 'in' parameter(s) renamed, {marked} signature(s) "
          f"made keyword-only, {anys} '...' type(s) made typing.Any")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
