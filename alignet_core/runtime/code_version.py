"""A stage's code version, computed from the import graph instead of a hand-kept list of modules.

The version hashes the source of every `alignet_core` module that the stage's module imports,
transitively, and the installed versions of the numeric libraries those modules import
(`NUMERIC_LIBRARIES`). Imports are read from the source (`ast`), not from `sys.modules`: imports
inside functions and under `TYPE_CHECKING` count too, so a lazily imported module is covered, and
nothing has to be imported to compute a key. Importing `a.b.c` also runs `a/__init__.py` and
`a/b/__init__.py`, so parent packages are part of the closure.

What is hashed is the module's code, not its text: the syntax tree without docstrings, other bare
string statements, comments, layout and the `description=` texts of config fields (`code_text`).
Editing a docstring, a comment or a field's description therefore changes no key; any edit to what
the code does changes every key whose closure holds the module.

Why: a list kept by hand goes stale. The lists this replaces left out the stage runner itself and
`hardware.py` (which picks the autocast dtype), so an edit there reused outputs the new code would
not make; a library upgrade (torch, FAISS) was never noticed at all.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "alignet_core"

#: libraries whose upgrade can change a stage's numbers: top-level import name → the distributions
#: that may provide it. Any of them that a stage's closure imports is part of its code version.
NUMERIC_LIBRARIES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",), "scipy": ("scipy",), "torch": ("torch",), "torchvision": ("torchvision",),
    "timm": ("timm",), "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss"),
    "zarr": ("zarr",), "numcodecs": ("numcodecs",), "sklearn": ("scikit-learn",), "PIL": ("pillow",),
    "safetensors": ("safetensors",),
}


@dataclass(frozen=True)
class ImportClosure:
    """The `alignet_core` modules a module imports, transitively (itself included), and the numeric
    libraries among their third-party imports; both sorted."""

    modules: tuple[str, ...]
    libraries: tuple[str, ...]


def package_dir() -> Path:
    """The folder of the installed `alignet_core` package."""
    return Path(__file__).resolve().parent.parent


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`: dotted name → file (`__init__.py` for a package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((PACKAGE, *parts))] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names an import statement may load: for `from a.b import x`, both `a.b` and `a.b.x`
    (x may be a submodule or an attribute; only names that are modules are kept later)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: Path, stamp: tuple[int, int], name: str) -> frozenset[str]:
    """`_imported_names` of the file at `path`, parsed once per process and file state (`stamp`: its
    modification time and size): every stage's key reads the same modules' imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return frozenset(_imported_names(tree, name, path.name == "__init__.py"))


def _direct_imports(name: str, path: Path, files: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules (parents included) and the numeric libraries that module `name` imports."""
    st = path.stat()
    modules: set[str] = set()
    libraries: set[str] = set()
    for imported in _parsed_imports(path, (st.st_mtime_ns, st.st_size), name):
        top = imported.split(".")[0]
        if top == PACKAGE:
            modules.update(n for n in _with_parents(imported) if n in files and n != name)
        elif top in NUMERIC_LIBRARIES:
            libraries.add(top)
    return modules, libraries


def import_graph(root: Path | None = None) -> dict[str, set[str]]:
    """Every module of the package → the package modules it imports (parents included)."""
    files = module_files(root or package_dir())
    return {name: _direct_imports(name, path, files)[0] for name, path in files.items()}


def import_closure(module: str, root: Path | None = None) -> ImportClosure:
    """The transitive `alignet_core` imports of `module` (a dotted name) in the package at `root`
    (default: the installed one), and the `NUMERIC_LIBRARIES` they import."""
    files = module_files(root or package_dir())
    if module not in files:
        raise ValueError(f"{module!r} is not a module of {PACKAGE} under {root or package_dir()}")
    seen: set[str] = set()
    libraries: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen or name not in files:
            continue
        seen.add(name)
        modules, libs = _direct_imports(name, files[name], files)
        todo.extend(modules - seen)
        libraries |= libs
    return ImportClosure(modules=tuple(sorted(seen)), libraries=tuple(sorted(libraries)))


class _TextFree(ast.NodeTransformer):
    """Drops what only documents: bare string statements (docstrings) and `description=` string
    keywords (pydantic field descriptions). A body left empty gets a `pass`."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            node.body = kept or [ast.Pass()]
        if isinstance(node, ast.Call):
            node.keywords = [k for k in node.keywords if not (k.arg == "description" and isinstance(k.value, ast.Constant)
                                                              and isinstance(k.value.value, str))]
        return node


@functools.lru_cache(maxsize=1024)
def _code_text(path: Path, stamp: tuple[int, int]) -> bytes:
    tree = _TextFree().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return ast.dump(tree, annotate_fields=False, include_attributes=False).encode()


def code_text(path: Path) -> bytes:
    """What of a module's source its code version hashes: the dump of its syntax tree without
    docstrings, comments, layout or field descriptions (parsed once per process and file state)."""
    st = path.stat()
    return _code_text(path, (st.st_mtime_ns, st.st_size))


@functools.cache
def installed_version(library: str) -> str:
    """The installed version(s) of the distributions that provide the top-level import `library`
    ('absent' when none does). Cached per process: the process computes with the versions it has
    imported, whatever is installed later."""
    versions = []
    for dist in NUMERIC_LIBRARIES.get(library, (library,)):
        try:
            versions.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ",".join(versions) or "absent"


def code_version(
    module: str,
    root: Path | None = None,
    library_version: Callable[[str], str] = installed_version,
) -> str:
    """Hash of the code (`code_text`) of `module`'s import closure and of its numeric libraries' versions
    (`library_version(name)`; the installed ones by default). 16 hex characters."""
    closure = import_closure(module, root)
    files = module_files(root or package_dir())
    h = hashlib.sha256()
    for name in closure.modules:
        h.update(name.encode() + b"\0" + code_text(files[name]) + b"\0")
    for lib in closure.libraries:
        h.update(f"{lib}={library_version(lib)}\0".encode())
    return h.hexdigest()[:16]
