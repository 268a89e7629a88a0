"""The container recipes install the same pinned stack from the project's pin files.

containers/versions.env holds the image-level pins, requirements/constraints.txt the Python ones.
Apptainer.def, Dockerfile.rocm and Dockerfile.cuda take every version from there and write none
themselves; containers/build-args.sh hands each recipe exactly the keys it declares, builds an
unpinned base image from the digest its tag resolves to (or the tag, with no registry client) and
records it, refuses one under STRICT_PINS=1, and builds a local image's ops for ROCM_ARCH;
containers/pin.sh (`make pin`) writes the digests; containers/build-ds-ops.sh builds DeepSpeed's ops
for the target GPU and CPU whatever the build machine is, and containers/check-ds-ops.py fails a
build that lacks one, cannot load one, or is not built for the GPU architecture. The Frontier job
runs the image without --rocm and copies in only the network path's host libraries.
The scripts run for real here, with stand-ins for pip, the compilers, rocminfo, the registry
clients, apptainer and docker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
PINS = CONTAINERS / "versions.env"
DEF = CONTAINERS / "Apptainer.def"
DOCKERFILE = CONTAINERS / "Dockerfile.rocm"
CUDA_DOCKERFILE = CONTAINERS / "Dockerfile.cuda"
RECIPES = [DEF, DOCKERFILE, CUDA_DOCKERFILE]
RECIPE_IDS = ["apptainer", "docker-rocm", "docker-cuda"]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
BUILD_ARGS = CONTAINERS / "build-args.sh"
VERSION_LITERAL = re.compile(r"(?<![\w{])\d+\.\d+(\.\d+)*(?![\w}])")
FAKE_DIGEST = "sha256:" + "ab" * 32
# Frontier's supported ROCm versions for PyTorch (OLCF "PyTorch on Frontier": 7.1.1 with torch
# 2.10 recommended; builds for 7.0.2 and 7.2.0 also recommended for PyTorch-only use).
OLCF_ROCM = {"7.0.2", "7.1.1", "7.2.0"}


def pin_keys() -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*)=", PINS.read_text(), flags=re.M)


RESOLVED = "sha256:" + "cd" * 32


@pytest.fixture
def pinned(tmp_path) -> Path:
    """versions.env with every base-image digest pinned (a well-formed digest)."""
    path = tmp_path / "versions.env"
    path.write_text(re.sub(r"^(\w+_DIGEST)=.*$", rf"\1={FAKE_DIGEST}", PINS.read_text(), flags=re.M))
    return path


@pytest.fixture
def unpinned(tmp_path) -> Path:
    path = tmp_path / "unpinned.env"
    path.write_text(re.sub(r"^(\w+_DIGEST)=.*$", r"\1=", PINS.read_text(), flags=re.M))
    return path


@pytest.fixture
def resolver(tmp_path) -> Path:
    """A registry stand-in: every tag resolves to RESOLVED, and each question is logged."""
    path = tmp_path / "resolve"
    path.write_text(f'#!/bin/sh\necho "$1" >> "{tmp_path}/asked"\necho {RESOLVED}\n')
    path.chmod(0o755)
    return path


def build_args(*args: str, **env: str) -> subprocess.CompletedProcess:
    """build-args.sh with no registry lookup unless FORGEPIPE_DIGEST_RESOLVER is given."""
    base = {k: v for k, v in os.environ.items() if k not in ("STRICT_PINS", "ROCM_ARCH")}
    return subprocess.run(["bash", str(BUILD_ARGS), *args], capture_output=True, text=True,
                          env={**base, "FORGEPIPE_DIGEST_RESOLVER": "none", **env})


def as_dict(out: subprocess.CompletedProcess) -> dict[str, str]:
    assert out.returncode == 0, out.stderr
    words = out.stdout.split("\n")[:-1]
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


def declared(recipe: Path) -> list[str]:
    text = recipe.read_text()
    if recipe.suffix == ".def":
        return list(dict.fromkeys(re.findall(r"\{\{\s*(\w+)\s*\}\}", text)))
    return list(dict.fromkeys(re.findall(r"^ARG\s+(\w+)\s*$", text, flags=re.M)))


def docker_labels(recipe: Path) -> dict[str, str]:
    return dict(re.findall(r'(forgepipe\.\w+)="\$\{(\w+)\}"', recipe.read_text()))


# --- the pin file and build-args.sh -------------------------------------------------------------


def test_pin_file_resolves_every_key_to_one_word(pinned):
    pins = as_dict(build_args(str(pinned)))
    assert list(pins) == pin_keys()
    for key, value in pins.items():
        assert value and "$" not in value and " " not in value, key
    assert pins["BASE_IMAGE"] == (
        f"rocm/pytorch:rocm{pins['ROCM_VERSION']}_ubuntu{pins['UBUNTU_VERSION']}"
        f"_py{pins['PYTHON_VERSION']}_pytorch_release_{pins['TORCH_VERSION']}"
    )
    # Pulled by digest, never by the tag alone.
    assert pins["BASE_IMAGE_REF"] == f"rocm/pytorch@{FAKE_DIGEST}"
    assert pins["CUDA_BASE_IMAGE_REF"] == f"pytorch/pytorch@{FAKE_DIGEST}"
    # Both base images carry the one torch version.
    assert pins["CUDA_BASE_IMAGE"].startswith(f"pytorch/pytorch:{pins['TORCH_VERSION']}-cuda{pins['CUDA_VERSION']}-")
    assert pins["CUDA_BASE_IMAGE"].endswith("-devel")  # nvcc, to build the ops
    assert pins["ROCM_VERSION"] in OLCF_ROCM
    assert pins["PYTORCH_ROCM_ARCH"] == "gfx90a" and pins["ROCM_WAVEFRONT_SIZE"] == "64"
    assert pins["CPU_MARCH"] == "znver3"
    assert "8.0" in pins["TORCH_CUDA_ARCH_LIST"].split(";") and pins["TORCH_CUDA_ARCH_LIST"].endswith("+PTX")


def test_checked_in_digests_are_empty_or_real():
    digests = dict(re.findall(r"^(\w+_DIGEST)=(.*)$", PINS.read_text(), flags=re.M))
    assert set(digests) == {"BASE_IMAGE_DIGEST", "CUDA_BASE_IMAGE_DIGEST"}
    assert all(d == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests.values()), digests


def test_an_unpinned_base_is_built_from_the_digest_its_tag_resolves_to_and_recorded(unpinned, pinned, resolver, tmp_path):
    lock = tmp_path / "versions.lock"
    out = build_args("--recipe", str(DEF), "--lock", str(lock), str(unpinned), FORGEPIPE_DIGEST_RESOLVER=str(resolver))
    pins = as_dict(out)
    tag = pins["BASE_IMAGE"]
    assert (tmp_path / "asked").read_text() == f"{tag}\n"  # the tag, asked once
    assert pins["BASE_IMAGE_REF"] == f"rocm/pytorch@{RESOLVED}" and pins["BASE_IMAGE_DIGEST"] == RESOLVED
    (note,) = out.stderr.strip().splitlines()
    assert f"BASE_IMAGE_DIGEST is not pinned: building from {tag}, which is {RESOLVED} now" in note
    # The lock holds exactly what the recipe was handed, and reads back as the same words.
    locked = dict(line.split("=", 1) for line in lock.read_text().splitlines() if not line.startswith("#"))
    assert {k: v.strip("'") for k, v in locked.items()} == pins
    # The pinned case pulls its digest without asking anyone.
    (tmp_path / "asked").unlink()
    pins = as_dict(build_args("--recipe", str(DEF), str(pinned), FORGEPIPE_DIGEST_RESOLVER=str(resolver)))
    assert pins["BASE_IMAGE_REF"] == f"rocm/pytorch@{FAKE_DIGEST}" and not (tmp_path / "asked").exists()


def test_an_unpinned_base_with_no_registry_client_is_built_from_the_tag_and_says_so(unpinned, tmp_path):
    failing = tmp_path / "resolve"
    failing.write_text("#!/bin/sh\necho 'resolve-digest.sh: no registry client here (looked for: skopeo)' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = build_args("--recipe", str(CUDA_DOCKERFILE), str(unpinned), FORGEPIPE_DIGEST_RESOLVER=str(failing))
    pins = as_dict(out)
    assert pins["CUDA_BASE_IMAGE_REF"] == pins["CUDA_BASE_IMAGE"]  # the tag itself
    assert pins["CUDA_BASE_IMAGE_DIGEST"] == "unresolved"
    (note,) = out.stderr.strip().splitlines()
    assert "no registry client here" in note and f"building from the tag {pins['CUDA_BASE_IMAGE']}" in note


def test_strict_pins_refuses_an_unpinned_base_and_every_malformed_digest_is_refused(tmp_path, pinned, unpinned):
    out = build_args("--recipe", str(DEF), str(unpinned), STRICT_PINS="1")
    assert out.returncode == 1 and out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert "BASE_IMAGE_DIGEST is not pinned" in line and "STRICT_PINS=1" in line and "make pin" in line
    assert build_args("--recipe", str(DEF), str(pinned), STRICT_PINS="1").returncode == 0
    for bad in ("sha256:UNPINNED", "sha256:abc", "latest"):
        pins = tmp_path / f"bad-{len(bad)}.env"
        pins.write_text(pinned.read_text().replace(f"CUDA_BASE_IMAGE_DIGEST={FAKE_DIGEST}", f"CUDA_BASE_IMAGE_DIGEST={bad}"))
        out = build_args("--recipe", str(CUDA_DOCKERFILE), str(pins))
        assert out.returncode == 1 and out.stdout == "", bad
        assert "CUDA_BASE_IMAGE_DIGEST" in out.stderr and "not a pinned digest" in out.stderr
        # The ROCm recipes do not use the CUDA pins, so they still build.
        assert build_args("--recipe", str(DOCKERFILE), str(pins)).returncode == 0


@pytest.mark.parametrize(
    ("arch", "expected", "wave"),
    [("gfx942", "gfx942", "64"), ("gfx1100", "gfx1100", "32"), ("gfx90a;gfx942", "gfx90a;gfx942", "64"),
     ("gfx1100,gfx1201", "gfx1100;gfx1201", "32"), ("", "gfx90a", "64")],
)
def test_rocm_arch_sets_the_ops_architecture_and_its_wavefront_size(pinned, arch, expected, wave):
    pins = as_dict(build_args("--recipe", str(DOCKERFILE), str(pinned), ROCM_ARCH=arch))
    assert (pins["PYTORCH_ROCM_ARCH"], pins["ROCM_WAVEFRONT_SIZE"]) == (expected, wave)
    # The CUDA image has no such pins and ignores it.
    assert "PYTORCH_ROCM_ARCH" not in as_dict(build_args("--recipe", str(CUDA_DOCKERFILE), str(pinned), ROCM_ARCH=arch))


@pytest.mark.parametrize(("arch", "message"), [("gfx942;gfx1100", "mixes wavefront sizes"), ("sm_90", "not an AMD GPU")])
def test_rocm_arch_refuses_mixed_wavefronts_and_non_amd_names(pinned, arch, message):
    out = build_args("--recipe", str(DOCKERFILE), str(pinned), ROCM_ARCH=arch)
    assert out.returncode == 1 and out.stdout == "" and message in out.stderr


def test_host_rocm_arch_reads_the_kfd_topology(tmp_path):
    nodes = tmp_path / "nodes"
    for node, version in enumerate([0, 90010, 90010, 110000, 90402]):  # a CPU node, then GPUs
        (nodes / str(node)).mkdir(parents=True)
        (nodes / str(node) / "properties").write_text(f"cpu_cores_count 0\ngfx_target_version {version}\n")
    script = CONTAINERS / "host-rocm-arch.sh"
    env = {"PATH": "/usr/bin:/bin", "FORGEPIPE_KFD_TOPOLOGY": str(nodes)}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, "gfx90a;gfx1100;gfx942\n")
    out = subprocess.run(["bash", str(script)], env={**env, "FORGEPIPE_KFD_TOPOLOGY": str(tmp_path / "none")},
                         capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, "")  # no AMD GPU: make docker keeps versions.env's gfx90a


def test_pin_writes_every_digest_or_nothing(unpinned, resolver, tmp_path):
    pin = CONTAINERS / "pin.sh"
    before = unpinned.read_text()
    out = subprocess.run(["bash", str(pin), "--dry-run", str(unpinned)], capture_output=True, text=True,
                         env={**os.environ, "FORGEPIPE_DIGEST_RESOLVER": str(resolver)})
    assert out.returncode == 0 and unpinned.read_text() == before
    assert f"BASE_IMAGE_DIGEST={RESOLVED}" in out.stdout and f"CUDA_BASE_IMAGE_DIGEST={RESOLVED}" in out.stdout
    out = subprocess.run(["bash", str(pin), str(unpinned)], capture_output=True, text=True,
                         env={**os.environ, "FORGEPIPE_DIGEST_RESOLVER": str(resolver)})
    assert out.returncode == 0, out.stderr
    after = unpinned.read_text()
    assert re.findall(r"^(\w+_DIGEST)=(.*)$", after, flags=re.M) == [
        ("BASE_IMAGE_DIGEST", RESOLVED), ("CUDA_BASE_IMAGE_DIGEST", RESOLVED)]
    assert [line for line in after.splitlines() if "_DIGEST=" not in line] == [
        line for line in before.splitlines() if "_DIGEST=" not in line]
    # The build then pulls the pinned digests and asks no one.
    assert as_dict(build_args("--recipe", str(DEF), str(unpinned), STRICT_PINS="1"))["BASE_IMAGE_DIGEST"] == RESOLVED
    # No registry client: one line, the file untouched.
    out = subprocess.run(["bash", str(pin), str(unpinned)], capture_output=True, text=True,
                         env={**os.environ, "FORGEPIPE_DIGEST_TOOLS": ""})
    assert out.returncode == 1 and unpinned.read_text() == after
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("pin.sh: nothing written: resolve-digest.sh: no registry client here")


def fake_tool(bindir: Path, name: str, body: str) -> None:
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bindir / name).chmod(0o755)


def test_resolve_digest_asks_the_first_client_that_answers(tmp_path):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "skopeo", "echo 'FATA[0000] Error: unauthorized' >&2; exit 1")
    fake_tool(bindir, "crane", f'[ "$1" = digest ] && echo {RESOLVED}')
    fake_tool(bindir, "docker", 'case "$*" in "buildx version") exit 0;; *) printf "Name: x\\nDigest:    '
              f'{FAKE_DIGEST}\\n";; esac')
    script = CONTAINERS / "resolve-digest.sh"

    def resolve(tools: str):
        return subprocess.run(["bash", str(script), "rocm/pytorch:tag"], capture_output=True, text=True,
                              env={"PATH": f"{bindir}:/usr/bin:/bin", "FORGEPIPE_DIGEST_TOOLS": tools})

    assert resolve("skopeo crane docker").stdout == f"{RESOLVED}\n"  # skopeo refused, crane answered
    assert resolve("docker").stdout == f"{FAKE_DIGEST}\n"  # docker buildx imagetools inspect's Digest line
    out = resolve("skopeo")
    assert out.returncode == 1 and "unauthorized" in out.stderr and len(out.stderr.splitlines()) == 1


def test_make_sif_and_docker_build_with_the_resolved_digest_and_the_hosts_arch(resolver, tmp_path):
    bindir = tmp_path / "bin"
    fake_tool(bindir, "apptainer", f'echo "apptainer $*" > "{tmp_path}/called"')
    fake_tool(bindir, "docker", f'echo "docker $*" > "{tmp_path}/called"')
    nodes = tmp_path / "nodes" / "1"
    nodes.mkdir(parents=True)
    (nodes / "properties").write_text("gfx_target_version 90402\n")  # an MI300X workstation
    lock = tmp_path / "versions.lock"
    env = {**{k: v for k, v in os.environ.items() if k not in ("STRICT_PINS", "ROCM_ARCH", "MAKEFLAGS")},
           "PATH": f"{bindir}:{os.environ['PATH']}", "FORGEPIPE_DIGEST_RESOLVER": str(resolver),
           "FORGEPIPE_KFD_TOPOLOGY": str(nodes.parent)}
    versions_before = PINS.read_text()

    def make(*args: str) -> str:
        out = subprocess.run(["make", "--no-print-directory", *args, f"LOCK={lock}", f"SIF={tmp_path}/forge.sif"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return (tmp_path / "called").read_text()

    called = make("sif")
    assert called.startswith("apptainer build ") and called.rstrip().endswith(f"{tmp_path}/forge.sif containers/Apptainer.def")
    expected_ref = f"BASE_IMAGE_REF=rocm/pytorch@{RESOLVED}" if not re.search(
        r"^BASE_IMAGE_DIGEST=sha256:", versions_before, flags=re.M) else "BASE_IMAGE_REF=rocm/pytorch@sha256:"
    assert expected_ref in called and "PYTORCH_ROCM_ARCH=gfx90a" in called  # Frontier's, whatever this host has
    assert "BASE_IMAGE_DIGEST=" in lock.read_text()
    called = make("docker")
    assert "PYTORCH_ROCM_ARCH=gfx942 --build-arg ROCM_WAVEFRONT_SIZE=64" in called  # the host's GPU
    assert called.rstrip().endswith("-f containers/Dockerfile.rocm -t forgepipe:rocm .")
    assert "PYTORCH_ROCM_ARCH=gfx1100" in make("docker", "ROCM_ARCH=gfx1100")
    assert "TORCH_CUDA_ARCH_LIST" in make("docker", "GPU=nvidia")
    # STRICT_PINS=1 stops before the build when a digest is unpinned.
    if not re.search(r"^BASE_IMAGE_DIGEST=sha256:", versions_before, flags=re.M):
        (tmp_path / "called").unlink()
        out = subprocess.run(["make", "sif", "STRICT_PINS=1", f"LOCK={lock}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and not (tmp_path / "called").exists() and "STRICT_PINS=1" in out.stderr
    assert PINS.read_text() == versions_before


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_build_args_hand_each_recipe_exactly_the_keys_it_declares(recipe, pinned):
    pins = as_dict(build_args("--recipe", str(recipe), str(pinned)))
    assert list(pins) == declared(recipe)
    assert set(pins) <= set(pin_keys()) | {"FORGEPIPE_GIT_COMMIT"}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert pins["FORGEPIPE_GIT_COMMIT"] == (commit or "unknown")


def test_build_args_refuse_a_recipe_key_that_is_not_pinned(tmp_path, pinned):
    recipe = tmp_path / "Dockerfile"
    recipe.write_text("ARG BASE_IMAGE_REF\nFROM ${BASE_IMAGE_REF}\nARG NOT_A_PIN\n")
    out = build_args("--recipe", str(recipe), str(pinned))
    assert out.returncode == 1 and "NOT_A_PIN" in out.stderr


# --- the recipes ----------------------------------------------------------------------------------


def test_apptainer_def_templates_its_pins_and_labels_every_one():
    text = DEF.read_text()
    used = set(declared(DEF))
    assert used <= set(pin_keys()) | {"FORGEPIPE_GIT_COMMIT"}
    rocm_pins = {k for k in pin_keys() if not k.startswith(("CUDA_", "TORCH_CUDA"))}
    assert rocm_pins <= used, f"unused ROCm pins: {rocm_pins - used}"
    sections = def_sections(text)
    assert re.search(r"^Bootstrap:\s*docker$", sections["header"], flags=re.M)
    assert re.search(r"^From:\s*\{\{\s*BASE_IMAGE_REF\s*\}\}$", sections["header"], flags=re.M)
    labelled = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", sections["labels"]))
    assert labelled == used, f"labels miss {used - labelled}"
    # No double braces in comments: nothing there for a templating pass to trip on.
    assert not [line for line in text.splitlines() if line.lstrip().startswith("#") and "{{" in line]


def test_rendered_def_pulls_the_base_by_digest_and_has_no_placeholders(pinned):
    pins = as_dict(build_args("--recipe", str(DEF), str(pinned)))
    rendered = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: pins[m.group(1)], DEF.read_text())
    assert "{{" not in rendered
    header = def_sections(rendered)["header"]
    assert re.search(rf"^From:\s*rocm/pytorch@{FAKE_DIGEST}$", header, flags=re.M)
    assert f"aws-ofi-nccl-{pins['AWS_OFI_NCCL_VERSION']}.tar.gz" in rendered


@pytest.mark.parametrize(
    ("recipe", "base"), [(DOCKERFILE, "BASE_IMAGE_REF"), (CUDA_DOCKERFILE, "CUDA_BASE_IMAGE_REF")], ids=RECIPE_IDS[1:]
)
def test_dockerfile_takes_every_pin_as_an_argument_without_default(recipe, base):
    lines = code_lines(recipe.read_text())
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM"))
    assert lines[:first_from] == [f"ARG {base}"]  # no default written here
    assert lines[first_from] == f"FROM ${{{base}}}"
    args = re.findall(r"^ARG\s+(\S+)$", "\n".join(lines[first_from:]), flags=re.M)
    assert not any("=" in a for a in args)
    assert set(args) <= set(pin_keys()) | {"FORGEPIPE_GIT_COMMIT"}
    # Every argument but the commit is recorded as a label.
    assert sorted(docker_labels(recipe).values()) == sorted(a for a in args if a != "FORGEPIPE_GIT_COMMIT")
    assert 'ENTRYPOINT ["forgepipe"]' in lines


def test_rocm_recipes_label_the_pins_under_the_same_names():
    apptainer = dict(
        re.findall(r"^\s*(forgepipe\.\w+)\s+\{\{\s*(\w+)\s*\}\}", def_sections(DEF.read_text())["labels"], flags=re.M)
    )
    assert docker_labels(DOCKERFILE) == apptainer


def test_cuda_and_rocm_recipes_share_every_stack_pin():
    """The same torch, DeepSpeed ops, host CPU target and Python pins on a workstation as on Frontier."""
    shared = {"TORCH_VERSION", "CPU_MARCH", *(k for k in pin_keys() if k.startswith("DS_BUILD_"))}
    for recipe in RECIPES:
        assert shared <= set(declared(recipe)), recipe.name
    rocm, cuda = docker_labels(DOCKERFILE), docker_labels(CUDA_DOCKERFILE)
    assert {k: v for k, v in rocm.items() if v in shared} == {k: v for k, v in cuda.items() if v in shared}
    # Same DeepSpeed build path with every DS_BUILD_* pin, same constraints.
    for recipe, flavor in ((DEF, "rocm"), (DOCKERFILE, "rocm"), (CUDA_DOCKERFILE, "cuda")):
        text = recipe.read_text()
        assert f"containers/build-ds-ops.sh {flavor} /tmp/constraints.txt" in text
        for key in (k for k in pin_keys() if k.startswith("DS_BUILD_")):
            assert re.search(rf"{key}=(\{{\{{ {key} \}}\}}|\"\$\{{{key}\}}\")", text), (recipe.name, key)


@pytest.mark.parametrize("recipe", [*RECIPES, CONTAINERS / "build-ds-ops.sh"], ids=[*RECIPE_IDS, "build-ds-ops"])
def test_recipe_writes_no_version_itself(recipe):
    offenders = [
        line
        for line in code_lines(recipe.read_text())
        if VERSION_LITERAL.search(line) or re.search(r"==\s*\d", line)
    ]
    assert offenders == []


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_recipe_installs_python_packages_with_the_constraints_minus_torch(recipe):
    text = recipe.read_text()
    assert "grep -v '^torch==' /opt/forgepipe/requirements/constraints.txt > /tmp/constraints.txt" in text
    installs = re.findall(r"pip install[^\n]*", text)
    assert len(installs) == 1  # forgepipe (+ pytest for the image's own test); DeepSpeed via build-ds-ops.sh
    assert "-c /tmp/constraints.txt" in installs[0]
    assert installs[0].rstrip(" \\").endswith(" /opt/forgepipe pytest")
    (ds_install,) = re.findall(r"pip install[^\n]*", (CONTAINERS / "build-ds-ops.sh").read_text())
    assert ds_install.endswith('-c "$constraints" deepspeed')


@pytest.mark.parametrize("recipe", RECIPES, ids=RECIPE_IDS)
def test_image_checks_its_ops_runs_the_fast_tests_and_records_what_it_is(recipe):
    text = recipe.read_text()
    check = text.index("containers/check-ds-ops.py")
    tests = text.index('-m "not slow and not slurm" tests')
    assert check < tests
    if recipe.suffix == ".def":
        assert check > text.index("%test") and tests > text.index("%test")
    else:  # after the last install, before the entry point
        assert check > text.rindex("pip install") and tests < text.index("ENTRYPOINT")
    assert "PYTHONNOUSERSITE=1" in text and "FORGEPIPE_IMAGE_BUILD=" in text and "FORGEPIPE_GIT_COMMIT=" in text
    assert "base image torch" in text  # the base's torch is checked against TORCH_VERSION
    if recipe.suffix != ".def":  # forgepipe/tracking.py tags FORGEPIPE_IMAGE as container_image (run.sh sets tag@id)
        assert "FORGEPIPE_IMAGE=forgepipe-" in text


@pytest.mark.parametrize(("recipe", "digest"), [(DEF, "BASE_IMAGE_DIGEST"), (DOCKERFILE, "BASE_IMAGE_DIGEST"),
                                               (CUDA_DOCKERFILE, "CUDA_BASE_IMAGE_DIGEST")], ids=RECIPE_IDS)
def test_image_carries_the_pulled_digest_to_its_runs_mlflow_tags(recipe, digest, monkeypatch):
    from forgepipe.distributed import World
    from forgepipe.tracking import environment_tags

    text = recipe.read_text()
    assert re.search(rf"FORGEPIPE_BASE_IMAGE_DIGEST=(\{{\{{ {digest} \}}\}}|\$\{{{digest}\}})", text)
    monkeypatch.setenv("FORGEPIPE_BASE_IMAGE_DIGEST", RESOLVED)
    assert environment_tags(World())["base_image_digest"] == RESOLVED


@pytest.mark.parametrize("recipe", [DEF, DOCKERFILE], ids=RECIPE_IDS[:2])
def test_rocm_image_test_checks_the_ops_load_for_its_gpu_architecture(recipe):
    text = recipe.read_text()
    check = text[:text.index("containers/check-ds-ops.py", text.index("%test" if recipe.suffix == ".def" else "ENV "))]
    last = check[check.rindex("\n\n"):]
    assert re.search(r'PYTORCH_ROCM_ARCH="(\{\{ PYTORCH_ROCM_ARCH \}\}|\$\{PYTORCH_ROCM_ARCH\})"', last), last
    # Quoted wherever a shell reads it: ROCM_ARCH may be a ;-separated list.
    assert not re.search(r"PYTORCH_ROCM_ARCH=[{$]", text)


def test_the_rocminfo_stand_in_answers_for_each_architecture_of_a_list(build_host):
    run, _ = build_host
    out, record = run("rocm", PYTORCH_ROCM_ARCH="gfx942;gfx950")
    assert out.returncode == 0, out.stderr
    assert "PYTORCH_ROCM_ARCH=gfx942;gfx950" in record and re.search(r"^gfx942$", record, flags=re.M)


# --- the image at run time on Frontier: only the network path from the host ----------------------
# (No --rocm on the srun line: tests/test_frontier_scripts.py's dry run checks that line whole.)


def frontier_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    lib64 = tmp_path / "cray" / "libfabric" / "2.1.0" / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    (lib64 / "libfabric.so.1").write_bytes(b"")
    return {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "USER": "tester", "NODES": "2",
            "LD_LIBRARY_PATH": str(lib64), **extra}


def test_only_the_network_paths_host_libraries_are_copied_into_the_container(tmp_path):
    """ldd of the Cray libfabric names libcxi and json-c, but also libcurl, libssl, libdrm, libnuma:
    only the CXI provider's are copied in (APPTAINER_CONTAINLIBS goes first on the container's library
    path, over the image's own). env.sh's own function, with its file-exists test made true (this
    machine has no /usr/lib64 of a Cray node)."""
    closure = ["libcxi.so.1", "libjson-c.so.5", "libcurl.so.4", "libssl.so.3", "libcrypto.so.3", "libdrm.so.2",
               "libdrm_amdgpu.so.1", "libnuma.so.1", "libelf.so.1", "libnl-3.so.200", "libc.so.6"]
    fake_tool(tmp_path / "bin", "ldd", "".join(f"echo '\t{n} => /usr/lib64/{n} (0x1)'; " for n in closure))
    script = (
        f'. "{ROOT}/scripts/frontier/env.sh"\n'
        """eval "$(declare -f fp_fabric_libs | sed 's/\\[\\[ -e "\\$lib" \\]\\]/true/')"\n"""
        "fp_fabric_libs\n"
    )
    out = subprocess.run(["bash", "-c", script], env=frontier_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kept = {Path(p).name for p in out.stdout.split()}
    assert {"libcxi.so.1", "libjson-c.so.5", "libnl-3.so.200"} <= kept
    assert kept <= {"libcxi.so.1", "libjson-c.so.3", "libjson-c.so.5", "libnl-3.so.200", "libnl-route-3.so.200",
                    "libjansson.so.4", "libxpmem.so.0"}, kept


@pytest.mark.parametrize("recipe", [DEF, DOCKERFILE], ids=RECIPE_IDS[:2])
def test_rocm_library_path_extends_the_base_images(recipe):
    text = recipe.read_text()
    (value,) = re.findall(r"LD_LIBRARY_PATH=(\S+)", text)
    assert value.startswith(("${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}", "${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH}:}"))
    parts = re.sub(r"^\$\{LD_LIBRARY_PATH:\+\$\{?LD_LIBRARY_PATH\}?:\}", "", value).split(":")
    assert parts == ["/opt/rocm/lib", "/opt/aws-ofi-nccl/lib", "/opt/libfabric/lib"]


def test_constraints_minus_torch_keep_the_python_pins():
    kept = [line for line in CONSTRAINTS.read_text().splitlines() if not line.startswith("torch==")]
    pins = dict(line.split("==") for line in kept if "==" in line)
    assert "torch" not in pins
    assert {"deepspeed", "transformers", "mlflow", "pytest"} <= set(pins)


# --- DeepSpeed's ops: built for the target, checked ---------------------------------------------


def fake_deepspeed(root: Path, installed: dict[str, bool], accelerator: str = "cuda", modules=(),
                   broken=(), code_for=None) -> Path:
    """A DeepSpeed package whose op modules are a compiled-module file (under an interpreter tag no
    Python loads, holding GPU code objects for `code_for` when given) beside a Python module of the
    same name that imports, or raises as a missing library would (`broken`)."""
    pkg = root / "deepspeed"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.0.test'\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "git_version_info.py").write_text(f"installed_ops = {installed!r}\naccelerator_name = {accelerator!r}\n")
    for name in modules:
        bundle = b"".join(b"__CLANG_OFFLOAD_BUNDLE__hipv4-amdgcn-amd-amdhsa--" + a.encode() for a in code_for or ())
        (pkg / "ops" / f"{name}_op.cpython-399-x86_64-linux-gnu.so").write_bytes(b"\x7fELF" + bundle)
        (pkg / "ops" / f"{name}_op.py").write_text(
            "raise ImportError('libamdhip64.so.7: cannot open shared object file')\n" if name in broken else "")
    return root


def fake_torch(root: Path, arch_flags: str, hip: str | None = "7.1.25424") -> None:
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text(
        "import types\n__version__ = '2.10.0+rocm7.1'\n"
        f"version = types.SimpleNamespace(hip={hip!r}, cuda=None)\n"
        f"_C = types.SimpleNamespace(_cuda_getArchFlags=lambda: {arch_flags!r})\n"
    )


def check_ops(site: Path, **env: str) -> subprocess.CompletedProcess:
    ops = {"DS_BUILD_OPS": "0", "DS_BUILD_CPU_ADAM": "1", "DS_BUILD_FUSED_ADAM": "1", "DS_BUILD_QUANTIZER": "1"}
    return subprocess.run(
        [sys.executable, "-S", str(CONTAINERS / "check-ds-ops.py")],  # -S: no installed DeepSpeed
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(site), **ops, **env},
        capture_output=True,
        text=True,
    )


ALL_OPS = {"cpu_adam": True, "fused_adam": True, "quantizer": True}


def test_op_check_passes_when_every_op_is_installed(tmp_path):
    out = check_ops(fake_deepspeed(tmp_path, ALL_OPS, modules=ALL_OPS))
    assert out.returncode == 0, out.stderr
    assert "cpu_adam, fused_adam, quantizer" in out.stdout


@pytest.mark.parametrize(
    ("installed", "modules", "accelerator", "message"),
    [
        ({**ALL_OPS, "quantizer": False}, ALL_OPS, "cuda", "not installed: quantizer"),
        ({"cpu_adam": True, "fused_adam": True}, ALL_OPS, "cuda", "not installed: quantizer"),
        (ALL_OPS, ["cpu_adam", "quantizer"], "cuda", "no compiled module (<op>_op*.so) for: fused_adam"),
        (ALL_OPS, ALL_OPS, "cpu", "built for the 'cpu' accelerator"),
    ],
)
def test_op_check_fails_the_build_naming_what_is_missing(tmp_path, installed, modules, accelerator, message):
    out = check_ops(fake_deepspeed(tmp_path, installed, accelerator, modules))
    assert out.returncode == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_op_check_fails_when_a_prebuilt_op_does_not_load(tmp_path):
    out = check_ops(fake_deepspeed(tmp_path, ALL_OPS, modules=ALL_OPS, broken={"fused_adam"}))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "prebuilt ops do not load: fused_adam (libamdhip64.so.7: cannot open shared object file)" in out.stderr


def test_op_check_holds_the_gpu_architecture_to_torchs_arch_list_and_the_ops_code(tmp_path):
    site = fake_deepspeed(tmp_path, ALL_OPS, modules=ALL_OPS, code_for=["gfx90a", "gfx942"])
    fake_torch(site, "gfx90a gfx942 gfx1100")
    out = check_ops(site, PYTORCH_ROCM_ARCH="gfx90a")
    assert out.returncode == 0, out.stderr
    assert "GPU architecture gfx90a, all load" in out.stdout
    assert check_ops(site, PYTORCH_ROCM_ARCH="gfx90a;gfx942").returncode == 0
    # An architecture the ops carry no code for; one torch is not built for.
    out = check_ops(site, PYTORCH_ROCM_ARCH="gfx1100")
    assert out.returncode == 1 and "cpu_adam has no code for gfx1100" in out.stderr
    out = check_ops(site, PYTORCH_ROCM_ARCH="gfx1201")
    assert out.returncode == 1 and "torch 2.10.0+rocm7.1 is not built for gfx1201 (its arch list: gfx1100 gfx90a gfx942)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_op_check_without_readable_code_objects_judges_torch_only(tmp_path):
    site = fake_deepspeed(tmp_path, ALL_OPS, modules=ALL_OPS)  # compressed bundles show no targets
    fake_torch(site, "gfx90a")
    assert check_ops(site, PYTORCH_ROCM_ARCH="gfx90a").returncode == 0
    out = check_ops(site, PYTORCH_ROCM_ARCH="gfx942")
    assert out.returncode == 1 and "is not built for gfx942" in out.stderr


def test_op_check_fails_when_deepspeed_is_absent(tmp_path):
    out = check_ops(tmp_path)
    assert out.returncode == 1 and "cannot import DeepSpeed" in out.stderr


@pytest.fixture
def build_host(tmp_path):
    """A build machine as build-ds-ops.sh sees it: a stand-in python (pip), real-compiler stand-ins
    that print their arguments, and a rocminfo that reports the build machine's own (wrong) GPU."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record"
    rocm = tmp_path / "rocm"
    (rocm / "bin").mkdir(parents=True)
    (rocm / "bin" / "rocminfo").write_text("#!/bin/sh\necho '  Name: gfx1100'\necho '  Wavefront Size: 32(0x20)'\n")
    realcc = tmp_path / "realcc"
    realcc.mkdir()
    for name in ("cc", "gcc", "c++", "g++"):
        (realcc / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
    (bindir / "python").write_text(
        "#!/bin/bash\n"
        'if [[ "$1" == -m ]]; then\n'
        '  { echo "pip $*"; echo "DS_ACCELERATOR=$DS_ACCELERATOR PYTORCH_ROCM_ARCH=$PYTORCH_ROCM_ARCH '
        'TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST DS_BUILD_QUANTIZER=$DS_BUILD_QUANTIZER"\n'
        '    "$ROCM_PATH/bin/rocminfo" 2>/dev/null | grep -Eo -m1 "Wavefront Size:[[:space:]]+[0-9]+"\n'
        '    rocminfo 2>/dev/null | grep -o -m 1 "gfx.*"\n'
        '    "$CXX" -O3 -march=native -fopenmp -D__AVX512__ cpu_adam.cpp\n'
        '    g++ -march=native x.cpp; } >> "' + str(record) + '"\n'
        '  exit "${FAKE_PIP_RC:-0}"\n'
        "fi\n"
        f'echo "check $*" >> "{record}"\n'
        'exit "${FAKE_CHECK_RC:-0}"\n'
    )
    for path in [*bindir.iterdir(), *realcc.iterdir(), rocm / "bin" / "rocminfo"]:
        path.chmod(0o755)

    def run(flavor: str, **extra: str) -> tuple[subprocess.CompletedProcess, str]:
        env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "ROCM_PATH": str(rocm),
            "FORGEPIPE_ROCMINFO": str(rocm / "bin" / "rocminfo"),
            "FORGEPIPE_REAL_CC_DIR": str(realcc),
            "CPU_MARCH": "znver3",
            "PYTORCH_ROCM_ARCH": "gfx90a",
            "ROCM_WAVEFRONT_SIZE": "64",
            "TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX",
            "DS_BUILD_QUANTIZER": "1",
            **extra,
        }
        out = subprocess.run(
            ["bash", str(CONTAINERS / "build-ds-ops.sh"), flavor, "/tmp/constraints.txt"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        return out, record.read_text() if record.exists() else ""

    return run, rocm


def test_rocm_ops_are_built_for_gfx90a_wavefront_64_and_zen3_whatever_the_build_host(build_host):
    run, rocm = build_host
    out, record = run("rocm")
    assert out.returncode == 0, out.stderr
    assert "pip -m pip install --no-cache-dir --no-build-isolation -c /tmp/constraints.txt deepspeed" in record
    assert "DS_ACCELERATOR=cuda PYTORCH_ROCM_ARCH=gfx90a" in record and "DS_BUILD_QUANTIZER=1" in record
    assert re.search(r"^Wavefront Size:\s+64$", record, flags=re.M), record  # not the build GPU's 32
    assert re.search(r"^gfx90a$", record, flags=re.M)
    # Host ops: the target CPU and its AVX2 path, never the build CPU's.
    assert "g++ -O3 -march=znver3 -fopenmp -D__AVX256__ cpu_adam.cpp" in record
    assert "g++ -march=znver3 x.cpp" in record and "native" not in record and "AVX512" not in record
    assert record.rstrip().endswith(f"check {CONTAINERS / 'check-ds-ops.py'}")
    # The build machine's rocminfo is back afterwards.
    assert "gfx1100" in subprocess.run([str(rocm / "bin" / "rocminfo")], capture_output=True, text=True).stdout


def test_cuda_ops_are_built_for_the_pinned_architectures(build_host):
    run, _ = build_host
    out, record = run("cuda")
    assert out.returncode == 0, out.stderr
    assert "DS_ACCELERATOR=cuda PYTORCH_ROCM_ARCH=gfx90a TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX" in record
    assert "g++ -O3 -march=znver3 -fopenmp -D__AVX256__ cpu_adam.cpp" in record


@pytest.mark.parametrize(("extra", "what"), [({"FAKE_CHECK_RC": "1"}, "check"), ({"FAKE_PIP_RC": "1"}, "pip")])
def test_a_failed_op_build_or_check_fails_the_image_build(build_host, extra, what):
    run, rocm = build_host
    out, record = run("rocm", **extra)
    assert out.returncode != 0
    if what == "pip":
        assert "check " not in record  # nothing after a failed install
    assert "gfx1100" in (rocm / "bin" / "rocminfo").read_text()  # restored even so


def test_march_wrapper_makes_the_real_compiler_target_zen3(tmp_path):
    """Through march-cc, gcc given DeepSpeed's -march=native -D__AVX512__ compiles for Zen 3: AVX2,
    no AVX-512, whatever this machine's CPU is."""
    gcc = Path("/usr/bin/gcc")
    if not gcc.exists():
        pytest.skip("no gcc here")
    wrapper = tmp_path / "gcc"
    wrapper.write_bytes((CONTAINERS / "march-cc").read_bytes())
    wrapper.chmod(0o755)
    src = tmp_path / "probe.c"
    src.write_text(
        "#ifndef __znver3__\n#error not built for znver3\n#endif\n"
        "#ifndef __AVX2__\n#error no AVX2\n#endif\n"
        "#if defined(__AVX512F__) || defined(__AVX512__)\n#error AVX-512 code for a Zen 3 CPU\n#endif\n"
        "int probe(void) { return 0; }\n"
    )
    out = subprocess.run(
        [str(wrapper), "-O3", "-march=native", "-D__AVX512__", "-c", str(src), "-o", str(tmp_path / "probe.o")],
        env={"PATH": "/usr/bin:/bin", "CPU_MARCH": "znver3", "FORGEPIPE_REAL_CC_DIR": "/usr/bin"},
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    # Without the wrapper the same flags do not give a Zen 3 build (unless this machine is one).
    native = subprocess.run([str(gcc), "-march=native", "-dM", "-E", "-x", "c", "/dev/null"], capture_output=True, text=True)
    if "__znver3__" not in native.stdout:
        bare = subprocess.run([str(gcc), "-march=native", "-c", str(src), "-o", str(tmp_path / "bare.o")],
                              capture_output=True, text=True)
        assert bare.returncode != 0


def test_deepspeeds_own_op_builder_reads_the_target_gpu_from_the_rocminfo_stand_in(build_host, tmp_path):
    """DeepSpeed 0.19's OpBuilder (the real one, from this environment) asks rocminfo for the GPU
    architecture and the wavefront size; during build-ds-ops.sh it gets gfx90a and 64."""
    pytest.importorskip("deepspeed")
    run, _ = build_host
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from deepspeed.ops.op_builder.builder import OpBuilder\n"
        "print('DS', OpBuilder.get_rocm_gpu_arch(), OpBuilder.get_rocm_wavefront_size())\n"
    )
    if Path("/opt/rocm/bin/rocminfo").exists():
        pytest.skip("a real /opt/rocm here takes precedence in DeepSpeed's lookup")
    fake_python = tmp_path / "bin" / "python"
    fake_python.write_text(
        fake_python.read_text().replace(
            'if [[ "$1" == -m ]]; then\n',
            f'if [[ "$1" == -m ]]; then\n  "{sys.executable}" "{probe}" >> "{tmp_path / "record"}" 2>/dev/null\n',
        )
    )
    out, record = run("rocm")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^DS gfx90a 64$", record, flags=re.M), record
