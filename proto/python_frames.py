"""How a CPython frame is stored (schema.FRAME_KINDS "python"): name `module.qualname`,
module `file:line`. Defined once for the agent, which reads code objects
(node_agent/symbolize/python.py), and for OTLP, whose CPython frames carry the same
facts as a function's name and file name and a line number (proto/otlp.py).
"""

from __future__ import annotations

import re

KIND = "python"
# Where an import path starts in a file name: inside a zip archive (zipimport), or under a
# site-packages folder.
_IMPORT_ROOT = re.compile(r"\.(?:zip|egg|pyz|whl)/|/(?:site|dist)-packages/")


def module_name(filename: str) -> str:
    """A dotted module name from a code object's file: the path inside a zip archive
    (zipimport: PySpark's workers import pyspark from pyspark.zip), under site-packages or
    the standard library, else the file's stem (`<frozen importlib._bootstrap>` keeps its
    module)."""
    if filename.startswith("<frozen ") and filename.endswith(">"):
        return filename[8:-1]
    path = filename.removesuffix(".py")
    # The last archive or site folder: what follows is the import path.
    inside = [found.end() for found in _IMPORT_ROOT.finditer(path)]
    if inside:
        path = path[inside[-1] :]
    else:
        stdlib = re.search(r"/lib/python3\.\d+/", path)
        # Elsewhere, the file (a package: its folder) without what it is imported as.
        path = path[stdlib.end() :] if stdlib else "/".join(path.split("/")[-2:])
        if not stdlib and not path.endswith("/__init__"):
            path = path.rsplit("/", 1)[-1]
    return path.removesuffix("/__init__").replace("/", ".") or filename


def frame_name(qualname: str, filename: str) -> str:
    """`module.qualname`: the module tells apart functions of one name in different files
    in a flame graph; code of no file keeps its bare name."""
    return f"{module_name(filename)}.{qualname}" if filename else qualname


def frame_module(filename: str, line: int) -> str:
    """`file:line`, or the file alone when the line is not known (CPython's lines start at
    1; OTLP's 0 is "not set")."""
    return f"{filename}:{line}" if filename and line > 0 else filename


def source(name: str, module: str) -> tuple[str, str, int]:
    """(qualname, file, line) of a stored frame: what frame_name and frame_module were
    given. A name not of its file's module (none of the agent's are) stays whole."""
    filename, colon, line = module.rpartition(":")
    if not (colon and filename and line.isdigit()):
        filename, line = module, "0"
    prefix = f"{module_name(filename)}." if filename else ""
    return name.removeprefix(prefix), filename, int(line)
