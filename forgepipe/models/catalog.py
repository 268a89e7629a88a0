"""FORGE names -> local checkpoint directories.

Frontier compute nodes have no internet, so `--model forge-s` must mean a directory on the
file system, not a Hub download. A catalog YAML maps names to paths:

    models:
      forge-s: {path: forge-s4, params: 1.44B, description: ...}
      forge-m2-final: /lustre/orion/abc123/models/forge-m2-final   # shorthand: just the path

Relative paths are taken under $FORGEPIPE_MODEL_ROOT (else the working directory); `~` and
`$VARS` are expanded. The bundled catalog (forgepipe/assets/catalog.yaml) lists the published
FORGE family; a user catalog (`model.catalog`, else $FORGEPIPE_CATALOG) adds names and replaces
bundled ones of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from forgepipe.errors import ForgeError

MODEL_ROOT_ENV = "FORGEPIPE_MODEL_ROOT"
CATALOG_ENV = "FORGEPIPE_CATALOG"
_ENTRY_KEYS = ("path", "params", "description")


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: str  # as written in the catalog
    source: str  # the catalog file that defined it
    params: str = ""
    description: str = ""

    def local_path(self) -> Path:
        """The directory this name stands for, with $FORGEPIPE_MODEL_ROOT applied."""
        path = Path(os.path.expandvars(os.path.expanduser(self.path)))
        if not path.is_absolute():
            path = Path(os.environ.get(MODEL_ROOT_ENV) or ".") / path
        return path


def bundled_catalog() -> Path:
    return Path(str(resources.files("forgepipe") / "assets" / "catalog.yaml"))


def _read_catalog(path: Path) -> dict[str, CatalogEntry]:
    """Parse one catalog file; every mistake is a ForgeError naming the file and line."""
    if not path.is_file():
        raise ForgeError(f"model catalog not found: {path}")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ForgeError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ForgeError(f"{path}: expected a top-level 'models:' mapping of name -> path")
    models_node = next(v for k, v in root.value if k.value == "models")
    lines = {k.value: k.start_mark.line + 1 for k, _ in models_node.value}

    entries: dict[str, CatalogEntry] = {}
    for name, spec in data["models"].items():
        where = f"{path}:{lines.get(str(name), '?')}: model {name!r}"
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise ForgeError(f"{where}: expected a path or a mapping with 'path', got {spec!r}")
        unknown = set(spec) - set(_ENTRY_KEYS)
        if unknown:
            raise ForgeError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(_ENTRY_KEYS)})")
        if not isinstance(spec.get("path"), str) or not spec["path"]:
            raise ForgeError(f"{where}: needs a non-empty 'path'")
        entries[str(name)] = CatalogEntry(
            name=str(name),
            path=spec["path"],
            source=str(path),
            params=str(spec.get("params") or ""),
            description=str(spec.get("description") or ""),
        )
    return entries


def load_catalog(catalog: str | None = None) -> dict[str, CatalogEntry]:
    """The bundled catalog, extended/overridden by `catalog` (else $FORGEPIPE_CATALOG)."""
    entries = _read_catalog(bundled_catalog())
    user = catalog or os.environ.get(CATALOG_ENV)
    if user:
        entries.update(_read_catalog(Path(user).expanduser()))
    return entries


def list_models(catalog: str | None = None) -> dict[str, str]:
    """Name -> the local directory it resolves to (existing or not); `load_catalog` has the details."""
    return {name: str(entry.local_path()) for name, entry in load_catalog(catalog).items()}


def resolve_model(name_or_path: str, catalog: str | None = None) -> str:
    """A local directory, a catalog name, or a Hub id -> what `from_pretrained` should load.

    Order: an existing directory wins; then a catalog name (its directory must exist); a name
    starting with "forge" that the catalog does not know is a typo, not a Hub id; anything
    else is passed through as a Hub id (offline loading then fails in load.py, clearly).
    """
    if not name_or_path:
        raise ForgeError("no model given (a catalog name such as forge-s, or a directory)", key="model.name_or_path")
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        return str(local)
    entries = load_catalog(catalog)
    entry = entries.get(name_or_path)
    if entry is not None:
        path = entry.local_path()
        if not path.is_dir():
            raise ForgeError(
                f"model {name_or_path!r}: catalog path {path} does not exist "
                f"(set {MODEL_ROOT_ENV} or edit {entry.source})"
            )
        return str(path)
    if name_or_path.lower().startswith("forge"):
        raise ForgeError(f"model {name_or_path!r}: not in the catalog (known: {', '.join(entries)})")
    if name_or_path.startswith(("/", ".", "~")) or local.exists():
        raise ForgeError(f"model {name_or_path!r}: no such directory")
    return name_or_path
