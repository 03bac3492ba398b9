"""Readable frame names: perf-map entries of JIT runtimes, and demangled C++ symbols.

A perf map holds whatever its writer chose to print; the entry stays available as the
frame's module (see Symbolizer), the name shown is the part a flame graph needs:

- HotSpot (jcmd Compiler.perfmap, -XX:+DumpPerfMapAtExit): `long demo.Hotspots.run(long)`
  → `demo.Hotspots.run` (jit); its template interpreter, `Interpreter` (interpreted).
- perf-map-agent: `Lcom/acme/Ledger;::reconcile` → `com.acme.Ledger.reconcile` (jit).
- node --perf-basic-prof: `JS:*fib /app/fib.js:1:13` → `fib (fib.js:1)` (jit; the `~` tier,
  bytecode, and V8's `BytecodeHandler:`s are interpreted).
- python -X perf (3.12+): `py::Foo.bar:/app/mod.py` → `Foo.bar (mod.py)` (interpreted).

Anything else (HotSpot's stubs and adapters, V8's builtins) keeps its entry as its name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re

# HotSpot's external method names: `RETURN_TYPE package.Class.method(ARGS)`. Hidden classes
# (lambdas) end in `/0x<address>`, which differs per run: dropped so stacks merge.
_HOTSPOT = re.compile(r"(?:\S+ )?([\w$.]+?)(?:/0x[0-9a-f]+)?\.([\w$<>]+)\(.*\)")
_PERF_MAP_AGENT = re.compile(r"L([\w/$]+);::([\w$<>]+).*")
# V8's code kinds; the marker after the colon is its tier: ~ Ignition (bytecode), ^
# Sparkplug, + Maglev, * TurboFan. Older Node versions say LazyCompile / Function / Script.
_V8 = re.compile(r"(?:JS|LazyCompile|Function|Script|Eval):([~^+*]?)(.*?)(?: ?(\S+:\d+:\d+))?")
_PYTHON = re.compile(r"py::([^:]+):(.*)")
# V8's bytecode handlers are its interpreter, as HotSpot's "Interpreter" is.
_INTERPRETERS = ("Interpreter", "BytecodeHandler:")
_CACHE_SIZE = 1 << 16


@functools.lru_cache(maxsize=_CACHE_SIZE)
def runtime_frame(entry: str) -> tuple[str, str]:
    """(readable name, kind) of a perf-map entry; kind is "jit" or "interpreted"."""
    if entry.startswith(_INTERPRETERS):
        return entry, "interpreted"
    if match := _HOTSPOT.fullmatch(entry):
        return f"{match[1]}.{match[2]}", "jit"
    if match := _PERF_MAP_AGENT.fullmatch(entry):
        return f"{match[1].replace('/', '.')}.{match[2]}", "jit"
    if match := _V8.fullmatch(entry):
        tier, function, location = match.groups()
        name = _with_source(function or "(anonymous)", location, keep_line=True)
        return name, "interpreted" if tier == "~" else "jit"
    if match := _PYTHON.fullmatch(entry):
        return _with_source(match[1], match[2], keep_line=False), "interpreted"
    return entry, "jit"


def _with_source(function: str, location: str | None, *, keep_line: bool) -> str:
    """`function (file)`, or `function (file:line)`: the file's base name, for short names
    that still tell apart functions of one name in different files."""
    if not location:
        return function
    path, line = location, ""
    if keep_line:  # V8 locations end in :line:column
        parts = location.rsplit(":", 2)
        if len(parts) == 3 and parts[1].isdigit():
            path, line = parts[0], f":{parts[1]}"
    return f"{function} ({path.rsplit('/', 1)[-1]}{line})"


class _Demangler:
    """libstdc++'s own demangler (`__cxa_demangle`), through ctypes: no subprocess."""

    def __init__(self) -> None:
        self._demangle = None
        path = ctypes.util.find_library("stdc++")
        try:
            library = ctypes.CDLL(path or "libstdc++.so.6")
            self._free = ctypes.CDLL(None).free
        except OSError:
            return  # no C++ runtime on this host: names stay mangled
        self._free.argtypes = [ctypes.c_void_p]
        demangle = library["__cxa_demangle"]  # [] as a class would mangle the dunder name
        demangle.restype = ctypes.c_void_p
        demangle.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self._demangle = demangle

    def __call__(self, symbol: str) -> str | None:
        if self._demangle is None:
            return None
        status = ctypes.c_int()
        result = self._demangle(
            symbol.encode(errors="surrogateescape"), None, None, ctypes.byref(status)
        )
        if not result:
            return None
        try:
            return ctypes.string_at(result).decode(errors="replace")
        finally:
            self._free(result)


_demangler = _Demangler()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def native_name(symbol: str) -> str:
    """A C++ symbol demangled to its qualified function name, without parameters, return
    type or clone suffix (`_ZN9JavaCalls11call_helperEP9JavaValue...` →
    `JavaCalls::call_helper`); any other symbol as it is."""
    if not symbol.startswith("_Z"):
        return symbol
    demangled = _demangler(symbol)
    return _function_name(demangled) if demangled else symbol


_QUALIFIERS = (" const", " volatile", " &&", " &", " noexcept")


def _function_name(demangled: str) -> str:
    name = re.sub(r"( \[clone [^\]]*\])+$", "", demangled)
    stripped = True
    while stripped:
        stripped = False
        for qualifier in _QUALIFIERS:
            if name.endswith(qualifier):
                name, stripped = name[: -len(qualifier)], True
    if name.endswith(")"):  # the parameter list: the last balanced (...)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    if name.endswith(">"):  # a template function's name follows its return type
        space = _last_top_level_space(name)
        if space >= 0:
            name = name[space + 1 :]
    return name or demangled


def _last_top_level_space(name: str) -> int:
    depth, found = 0, -1
    for i, char in enumerate(name):
        if char in "<(":
            depth += 1
        elif char in ">)":
            depth -= 1
        elif char == " " and depth == 0 and not name[:i].endswith("operator"):
            found = i
    return found
