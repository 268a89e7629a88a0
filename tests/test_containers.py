"""The container recipes install the same pinned stack from the project's pin files.

containers/versions.env holds the image-level pins, requirements/constraints.txt the Python ones.
Apptainer.def, Dockerfile.rocm and Dockerfile.cuda take every version from there and write none
themselves; containers/build-args.sh hands each recipe exactly the keys it declares and refuses an
unpinned base-image digest; containers/build-ds-ops.sh builds DeepSpeed's ops for the target GPU
and CPU whatever the build machine is, and containers/check-ds-ops.py fails a build that lacks one.
The scripts run for real here, with stand-ins for pip, the compilers and rocminfo.
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


@pytest.fixture
def pinned(tmp_path) -> Path:
    """versions.env with its digest placeholders replaced by a well-formed digest."""
    path = tmp_path / "versions.env"
    path.write_text(re.sub(r"sha256:[A-Za-z0-9]+", FAKE_DIGEST, PINS.read_text()))
    return path


def build_args(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_ARGS), *args], capture_output=True, text=True)


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


def test_build_args_refuses_a_base_image_that_is_not_pinned_by_digest(tmp_path, pinned):
    digests = dict(re.findall(r"^(\w+_DIGEST)=(\S+)$", PINS.read_text(), flags=re.M))
    assert set(digests) == {"BASE_IMAGE_DIGEST", "CUDA_BASE_IMAGE_DIGEST"}
    real = build_args()
    if all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests.values()):
        assert real.returncode == 0, real.stderr
    else:  # the checked-in placeholder: every build stops here, loudly, naming the pin
        assert real.returncode == 1 and real.stdout == ""
        assert "_DIGEST=" in real.stderr and "not a pinned digest" in real.stderr
    for bad in ("sha256:UNPINNED", "sha256:abc", "latest"):
        pins = tmp_path / f"bad-{len(bad)}.env"
        pins.write_text(pinned.read_text().replace(f"CUDA_BASE_IMAGE_DIGEST={FAKE_DIGEST}", f"CUDA_BASE_IMAGE_DIGEST={bad}"))
        out = build_args("--recipe", str(CUDA_DOCKERFILE), str(pins))
        assert out.returncode == 1 and out.stdout == "", bad
        assert "CUDA_BASE_IMAGE_DIGEST" in out.stderr
        # The ROCm recipes do not use the CUDA pins, so they still build.
        assert build_args("--recipe", str(DOCKERFILE), str(pins)).returncode == 0


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


def fake_deepspeed(root: Path, installed: dict[str, bool], accelerator: str = "cuda", modules=()) -> Path:
    pkg = root / "deepspeed"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.0.test'\n")
    (pkg / "git_version_info.py").write_text(f"installed_ops = {installed!r}\naccelerator_name = {accelerator!r}\n")
    for name in modules:
        (pkg / "ops" / f"{name}_op.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    return root


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
