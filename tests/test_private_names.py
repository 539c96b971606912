"""No private name of Scrapy, Twisted, scrapy-redis, prometheus_client or scrapyd outside
``scrapy_ingest/_compat.py``, read from the source (the AST of each module):

* imports of a private module or name: ``from scrapy._x import y``, ``from scrapy.y import _z``,
  ``import twisted.web._newclient``;
* a private attribute of a module of theirs: ``twisted.web._newclient.X``;
* a private attribute (``obj._x``) or ``getattr``/``setattr``/``hasattr``/``delattr`` name
  (``"_x"``) that the package itself never defines, so it is someone else's, e.g.
  ``engine._slot``, ``queue._decode_request()``;
* a request meta key starting with ``_`` other than the package's own ``_ingest_*``
  (``meta["_auth_proxy"]``);
* names that are known to be theirs and private even without a ``_`` (``methods`` of a
  MiddlewareManager, the engine slot's ``inprogress``/``nextcall``, the downloader's
  ``download_request``), or that the package could define too (``"_job"``, ``"_slot"``),
  wherever they appear as an attribute or a string.

_compat.py holds each remaining one with the versions it holds for; tests/test_compat.py
checks them against the installed versions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scrapy_ingest"
ALLOWED = PACKAGE / "_compat.py"
FOREIGN = ("scrapy", "twisted", "scrapy_redis", "prometheus_client", "scrapyd")

#: private names of those packages, matched as attributes and as strings (a string matches
#: when it is one of these, or starts with one ending in "_")
KNOWN_PRIVATE = frozenset(
    {
        "_auth_proxy",  # HttpProxyMiddleware's meta key
        "_scheme_proxy",  # HttpProxyMiddleware's meta key
        "_job",  # scrapyd's job id spider argument
        "_slot",  # ExecutionEngine._slot
        "_cached_",  # StatsCollector's cached method wrappers
        "_decode_request",  # scrapy-redis queues
        "_encode_request",
        "_SilentHandler",  # prometheus_client.exposition
        "_newclient",  # twisted.web._newclient
        "_mw_methods_requiring_spider",  # MiddlewareManager
    }
)
#: undocumented internals of theirs without a leading "_", matched as attributes and strings
KNOWN_INTERNAL = frozenset(
    {"methods", "inprogress", "nextcall", "download_request", "download_request_async"}
)
META_CALLS = frozenset({"get", "pop", "setdefault"})
ATTR_CALLS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _known(text: str) -> bool:
    if text in KNOWN_PRIVATE or text in KNOWN_INTERNAL:
        return True
    return any(text.startswith(name) for name in KNOWN_PRIVATE if name.endswith("_"))


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != ALLOWED)


def _defined_names(trees: list[ast.Module]) -> set[str]:
    """Every name the package binds (functions, classes, arguments, variables, attributes it
    assigns, slots), and its own module names."""
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.rglob("*/")}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.alias) and node.asname:
                names.add(node.asname)
            elif (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
                and isinstance(node.value, (ast.Tuple, ast.List))
            ):
                names.update(
                    e.value
                    for e in node.value.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)
                )
    return names


def _root(module: str | None) -> str:
    return (module or "").split(".")[0]


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _is_meta(node: ast.expr) -> bool:
    """``meta``, ``request.meta``, ``self.meta``..."""
    name = _dotted(node)
    return name is not None and name.split(".")[-1] == "meta"


def _string(node: ast.expr | None) -> str | None:
    """A string constant, or the literal start of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _string(node.values[0])
    return None


class _Scan:
    """The private names of theirs in one module."""

    def __init__(self, defined: set[str]) -> None:
        self.defined = defined
        self.found: list[tuple[int, str]] = []
        self.foreign_names: set[str] = set()  # local names bound to their modules or objects
        self.other_modules: set[str] = set()  # local names bound to other modules (os._exit)

    def add(self, node: ast.AST, text: str) -> None:
        self.found.append((getattr(node, "lineno", 0), text))

    def imports(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or _root(alias.name)
                if _root(alias.name) not in FOREIGN:
                    self.other_modules.add(bound)
                    continue
                self.foreign_names.add(bound)
                if any(_is_private(part) for part in alias.name.split(".")):
                    self.add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and _root(node.module) in FOREIGN:
            module = node.module or ""
            if any(_is_private(part) for part in module.split(".")):
                self.add(node, f"from {module} import ...")
            for alias in node.names:
                self.foreign_names.add(alias.asname or alias.name)
                if _is_private(alias.name):
                    self.add(node, f"from {module} import {alias.name}")

    def attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        parts = dotted.split(".") if dotted is not None else [""]
        owner = parts[0]
        if owner in self.foreign_names and any(_is_private(part) for part in parts[1:]):
            self.add(node, dotted or "")
            return
        if owner in self.other_modules:
            return
        own = owner in {"self", "cls"} and _is_private(node.attr)  # self._job may be ours
        known = _known(node.attr) and not own
        if known or (_is_private(node.attr) and node.attr not in self.defined):
            self.add(node, f"attribute .{node.attr}")

    def attr_call(self, node: ast.Call) -> None:
        if not (isinstance(node.func, ast.Name) and node.func.id in ATTR_CALLS):
            return
        text = _string(node.args[1]) if len(node.args) >= 2 else None
        if text is not None and _is_private(text) and (text not in self.defined or _known(text)):
            self.add(node, f'{node.func.id}(..., "{text}")')

    def meta_key(self, node: ast.AST) -> None:
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in META_CALLS and _is_meta(node.func.value) and node.args:
                key = _string(node.args[0])
        elif isinstance(node, ast.Subscript) and _is_meta(node.value):
            key = _string(node.slice)
        elif isinstance(node, ast.Compare) and any(_is_meta(c) for c in node.comparators):
            key = _string(node.left)
        if key is not None and _is_private(key) and not key.startswith("_ingest"):
            self.add(node, f'meta["{key}"]')

    def string(self, node: ast.AST) -> None:
        if isinstance(node, (ast.Constant, ast.JoinedStr)):
            text = _string(node)
            if text is not None and _is_private(text) and _known(text):
                self.add(node, repr(text))


def violations(tree: ast.Module, defined: set[str]) -> list[tuple[int, str]]:
    scan = _Scan(defined)
    for node in ast.walk(tree):
        scan.imports(node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            scan.attribute(node)
        elif isinstance(node, ast.Call):
            scan.attr_call(node)
        scan.meta_key(node)
        scan.string(node)
    return scan.found


def _scan(paths: list[Path]) -> dict[str, list[tuple[int, str]]]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in paths}
    all_trees = [ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")]
    defined = _defined_names(all_trees)
    report = {}
    for path, tree in trees.items():
        found = violations(tree, defined)
        if found:
            report[str(path.relative_to(PACKAGE.parent))] = sorted(set(found))
    return report


def test_no_private_name_of_scrapy_and_co_outside_compat() -> None:
    report = _scan(_modules())
    assert not report, (
        "private names of scrapy, twisted, scrapy_redis, prometheus_client or scrapyd used "
        "outside scrapy_ingest/_compat.py (use a public API, or move the use into _compat.py "
        f"with the versions it holds for and a test in tests/test_compat.py): {report}"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from twisted.web._newclient import ResponseNeverReceived", "from twisted.web._newclient"),
        ("from prometheus_client.exposition import _SilentHandler", "import _SilentHandler"),
        ("import twisted.web._newclient", "import twisted.web._newclient"),
        ("import twisted.web\nx = twisted.web._newclient.X", "twisted.web._newclient.X"),
        ("def f(engine):\n    return engine._slot", "attribute ._slot"),
        ("def f(queue, d):\n    return queue._decode_request(d)", "attribute ._decode_request"),
        ('def f(spider):\n    return getattr(spider, "_job", None)', 'getattr(..., "_job")'),
        ('def f(request):\n    return request.meta["_auth_proxy"]', 'meta["_auth_proxy"]'),
        ('def f(meta):\n    meta.pop("_auth_proxy", None)', 'meta["_auth_proxy"]'),
        ('def f(request):\n    return "_x" in request.meta', 'meta["_x"]'),
        ('KEYS = ("proxy", "_auth_proxy")', "'_auth_proxy'"),
        ('def f(name):\n    return f"_cached_{name}"', "'_cached_'"),
        ("def f(self):\n    return self.methods['process_item']", "attribute .methods"),
        ("def f(slot):\n    slot.nextcall.schedule()", "attribute .nextcall"),
    ],
)
def test_the_scan_finds_each_kind_of_private_name(source: str, expected: str) -> None:
    found = violations(ast.parse(source), {"f", "engine", "queue", "spider", "d", "x"})
    assert any(expected in text for _, text in found), found


@pytest.mark.parametrize(
    "source",
    [
        "from twisted.web.client import ResponseNeverReceived",
        "class A:\n    def __init__(self):\n        self._x = 1\n    def f(self, o):\n"
        "        return o._x",
        'def f(request):\n    request.meta["_ingest_proxy"] = 1',
        'def f(request):\n    return request.meta.get("proxy")',
        "import scrapy\nx = scrapy.__version__",
    ],
)
def test_the_scan_leaves_public_and_own_names_alone(source: str) -> None:
    tree = ast.parse(source)
    assert violations(tree, _defined_names([tree])) == []
