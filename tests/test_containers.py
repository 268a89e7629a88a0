"""The two container recipes install the same pinned stack from the project's pin files.

containers/versions.env holds the image-level pins, requirements/constraints.txt the Python ones.
Apptainer.def and Dockerfile.rocm must take every version from there and write none themselves.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "containers" / "versions.env"
DEF = ROOT / "containers" / "Apptainer.def"
DOCKERFILE = ROOT / "containers" / "Dockerfile.rocm"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
VERSION_LITERAL = re.compile(r"(?<![\w{])\d+\.\d+(\.\d+)*(?![\w}])")


def pin_keys() -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*)=", PINS.read_text(), flags=re.M)


def resolved_pins() -> dict[str, str]:
    """versions.env as the builds see it: through containers/build-args.sh."""
    out = subprocess.run(
        [str(ROOT / "containers" / "build-args.sh")], capture_output=True, text=True, check=True
    )
    words = out.stdout.split()
    assert words[::2] == ["--build-arg"] * (len(words) // 2)
    return dict(w.split("=", 1) for w in words[1::2])


def def_sections(text: str) -> dict[str, str]:
    """Apptainer def file -> {'header': ..., 'labels': ..., 'post': ...}."""
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in text.splitlines():
        match = re.match(r"^%(\w+)", line)
        if match:
            current = match.group(1)
            sections.setdefault(current, [])
        else:
            sections[current].append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_pin_file_resolves_every_key_to_one_word():
    pins = resolved_pins()
    assert list(pins) == pin_keys()
    for key, value in pins.items():
        assert value and "$" not in value and " " not in value, key
    # A real rocm/pytorch tag, composed from the pins it names.
    assert pins["BASE_IMAGE"] == (
        f"rocm/pytorch:rocm{pins['ROCM_VERSION']}_ubuntu{pins['UBUNTU_VERSION']}"
        f"_py{pins['PYTHON_VERSION']}_pytorch_release_{pins['TORCH_VERSION']}"
    )
    assert pins["PYTORCH_ROCM_ARCH"] == "gfx90a"


def test_apptainer_def_templates_every_pin_and_nothing_else():
    text = DEF.read_text()
    keys = set(pin_keys())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    # Apptainer stops on an undefined {{ KEY }} and complains about passed keys left unused.
    assert used == keys
    sections = def_sections(text)
    assert re.search(r"^Bootstrap:\s*docker$", sections["header"], flags=re.M)
    assert re.search(r"^From:\s*\{\{\s*BASE_IMAGE\s*\}\}$", sections["header"], flags=re.M)
    labelled = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", sections["labels"]))
    assert labelled == keys, f"labels miss {keys - labelled}"


def test_rendered_def_has_the_pinned_base_and_no_placeholders():
    pins = resolved_pins()
    rendered = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: pins[m.group(1)], DEF.read_text())
    assert "{{" not in rendered
    header = def_sections(rendered)["header"]
    assert re.search(rf"^From:\s*{re.escape(pins['BASE_IMAGE'])}$", header, flags=re.M)
    assert f"aws-ofi-nccl-{pins['AWS_OFI_NCCL_VERSION']}.tar.gz" in rendered


def test_dockerfile_takes_every_pin_as_an_argument_without_default():
    text = DOCKERFILE.read_text()
    lines = code_lines(text)
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM"))
    assert lines[:first_from] == ["ARG BASE_IMAGE"]  # no default written here
    assert lines[first_from] == "FROM ${BASE_IMAGE}"
    args = re.findall(r"^ARG\s+(\S+)$", "\n".join(lines[first_from:]), flags=re.M)
    assert sorted(args) == sorted(pin_keys())
    assert not any("=" in a for a in args)
    labels = dict(re.findall(r'(forgepipe\.\w+)="\$\{(\w+)\}"', text))
    assert sorted(labels.values()) == sorted(pin_keys())
    assert 'ENTRYPOINT ["forgepipe"]' in lines


def test_both_recipes_label_the_pins_under_the_same_names():
    docker = dict(re.findall(r'(forgepipe\.\w+)="\$\{(\w+)\}"', DOCKERFILE.read_text()))
    apptainer = dict(
        re.findall(
            r"^\s*(forgepipe\.\w+)\s+\{\{\s*(\w+)\s*\}\}", def_sections(DEF.read_text())["labels"], flags=re.M
        )
    )
    assert docker == apptainer


@pytest.mark.parametrize("recipe", [DEF, DOCKERFILE], ids=["apptainer", "docker"])
def test_recipe_writes_no_version_itself(recipe):
    offenders = [
        line
        for line in code_lines(recipe.read_text())
        if VERSION_LITERAL.search(line) or re.search(r"==\s*\d", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("recipe", [DEF, DOCKERFILE], ids=["apptainer", "docker"])
def test_recipe_installs_python_packages_with_the_constraints_minus_torch(recipe):
    text = recipe.read_text()
    assert "grep -v '^torch==' /opt/forgepipe/requirements/constraints.txt > /tmp/constraints.txt" in text
    installs = re.findall(r"pip install[^\n]*", text)
    assert len(installs) == 2  # DeepSpeed (ops built), then forgepipe
    assert all("-c /tmp/constraints.txt" in line for line in installs)
    assert installs[0].rstrip(" \\").endswith(" deepspeed")
    assert installs[1].rstrip(" \\").endswith(" /opt/forgepipe")
    # The DeepSpeed install sees every DS_BUILD_* pin.
    for key in (k for k in pin_keys() if k.startswith("DS_BUILD_")):
        assert re.search(rf"{key}=(\{{\{{ {key} \}}\}}|\"\$\{{{key}\}}\")", text), key


def test_constraints_minus_torch_keep_the_python_pins():
    kept = [line for line in CONSTRAINTS.read_text().splitlines() if not line.startswith("torch==")]
    pins = dict(line.split("==") for line in kept if "==" in line)
    assert "torch" not in pins
    assert {"deepspeed", "transformers", "mlflow"} <= set(pins)
