"""Catalog names -> local directories, and the errors a user sees when that fails."""

from pathlib import Path

import pytest

from forgepipe.errors import ForgeError
from forgepipe.models.catalog import bundled_catalog, list_models, load_catalog, resolve_model

PUBLISHED = ["forge-bio", "forge-che", "forge-eng", "forge-mat", "forge-phy", "forge-soc",
             "forge-s1", "forge-s2", "forge-s3", "forge-s4", "forge-m1", "forge-m2", "forge-l"]


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    root = tmp_path / "models"
    root.mkdir()
    monkeypatch.setenv("FORGEPIPE_MODEL_ROOT", str(root))
    monkeypatch.delenv("FORGEPIPE_CATALOG", raising=False)
    return root


def test_bundled_catalog_lists_the_forge_family():
    entries = load_catalog()
    assert set(PUBLISHED) | {"forge-s", "forge-m"} <= set(entries)
    assert entries["forge-s"].path == "forge-s4"
    assert entries["forge-m"].path == "forge-m2"
    assert entries["forge-l"].params == "25.6B"
    assert {entries[n].params for n in ("forge-m1", "forge-m2")} == {"13B"}


def test_catalog_name_resolves_under_model_root(model_root):
    (model_root / "forge-s4").mkdir()
    assert resolve_model("forge-s") == str(model_root / "forge-s4")
    assert resolve_model("forge-s4") == str(model_root / "forge-s4")


def test_missing_catalog_directory_names_path_variable_and_file(model_root):
    with pytest.raises(ForgeError) as err:
        resolve_model("forge-m")
    msg = str(err.value)
    assert f"catalog path {model_root / 'forge-m2'} does not exist" in msg
    assert "FORGEPIPE_MODEL_ROOT" in msg and str(bundled_catalog()) in msg
    assert "\n" not in msg


def test_user_catalog_adds_and_overrides_names(model_root, tmp_path, monkeypatch):
    final = tmp_path / "elsewhere" / "forge-m2-final"
    final.mkdir(parents=True)
    (model_root / "my-small").mkdir()
    user = tmp_path / "catalog.yaml"
    user.write_text(f"models:\n  forge-m2-final: {final}\n  forge-s: {{path: my-small, params: 1.44B}}\n")

    assert resolve_model("forge-m2-final", catalog=str(user)) == str(final)
    assert resolve_model("forge-s", catalog=str(user)) == str(model_root / "my-small")
    listed = list_models(str(user))
    assert listed["forge-m2-final"] == str(final) and listed["forge-l"] == str(model_root / "forge-l")
    # the same file through the environment variable
    monkeypatch.setenv("FORGEPIPE_CATALOG", str(user))
    assert resolve_model("forge-m2-final") == str(final)


def test_unknown_forge_name_lists_known_names(model_root):
    with pytest.raises(ForgeError, match=r"'forge-xl': not in the catalog \(known: .*forge-s4.*forge-m2"):
        resolve_model("forge-xl")


def test_local_directory_wins_and_hub_ids_pass_through(model_root, tmp_path):
    local = tmp_path / "forge-s"  # named like a catalog entry, but a real directory
    local.mkdir()
    assert resolve_model(str(local)) == str(local)
    assert resolve_model("EleutherAI/gpt-neox-20b") == "EleutherAI/gpt-neox-20b"
    with pytest.raises(ForgeError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ForgeError, match="no model given"):
        resolve_model("")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models:\n  a: {path: x\n", r"catalog\.yaml:\d+: invalid YAML"),
        ("models:\n  a: x\n  b: {params: 1B}\n", r"catalog\.yaml:3: model 'b': needs a non-empty 'path'"),
        ("models:\n  a: {path: x, pth: y}\n", r"catalog\.yaml:2: model 'a': unknown key\(s\) \['pth'\]"),
        ("- a\n- b\n", r"catalog\.yaml: expected a top-level 'models:' mapping"),
    ],
)
def test_bad_catalog_file_errors_name_file_and_line(tmp_path, model_root, text, expected):
    user = tmp_path / "catalog.yaml"
    user.write_text(text)
    with pytest.raises(ForgeError, match=expected):
        load_catalog(str(user))


def test_missing_user_catalog(tmp_path, model_root):
    with pytest.raises(ForgeError, match="model catalog not found"):
        load_catalog(str(Path(tmp_path) / "nope.yaml"))
