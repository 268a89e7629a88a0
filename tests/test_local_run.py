"""scripts/local/run.sh: the Docker command for a workstation run, printed (--dry-run) and run
(with a stand-in `docker` that records its arguments). The script runs for real under bash."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "scripts" / "local" / "run.sh"
DATA = ROOT / "examples" / "data" / "sample_pairs.jsonl"


def run(args, tmp_path, extra=None, path_dirs=()):
    env = {
        "PATH": ":".join([*map(str, path_dirs), "/usr/bin", "/bin"]),
        "HOME": str(tmp_path / "home"),
        "USER": "tester",
        **(extra or {}),
    }
    return subprocess.run(["bash", str(RUN), *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)


def command(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if not line.startswith("#"))
    return shlex.split(line)


def pairs(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == flag]


@pytest.fixture
def stage_args(tmp_path):
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    return ["--model", model, "--data", DATA, "--output-dir", tmp_path / "runs" / "sft"], model


def test_amd_dry_run_prints_the_rocm_docker_command(tmp_path, stage_args):
    args, model = stage_args
    out = run(["--dry-run", "--gpus", "1", "sft", *args], tmp_path)
    words = command(out)
    assert words[:2] == ["docker", "run"]
    for flag in ("--device=/dev/kfd", "--device=/dev/dri", "--ipc=host", "--rm"):
        assert flag in words, flag
    assert "video" in pairs(words, "--group-add")
    assert any(w.startswith("--shm-size=") for w in words)
    assert "--gpus" not in words
    # The image's entry point is forgepipe: the stage and its options follow the image unchanged.
    i = words.index("forgepipe:rocm")
    assert words[i + 1:] == ["sft", *map(str, args)]
    # Model, data and the fresh output directory are bound at the same path, and the output
    # directory is made before the run (a dry run only says so).
    volumes = pairs(words, "-v")
    for path in (model, DATA.parent, tmp_path / "runs" / "sft", tmp_path):
        assert f"{path}:{path}" in volumes, path
    assert f"# created before the run: {tmp_path / 'runs' / 'sft'}" in out.stdout
    assert not (tmp_path / "runs").exists()
    assert pairs(words, "-w") == [str(tmp_path)]
    # The shared environment file: caches, no user site; no Slingshot settings on a workstation.
    env = dict(e.split("=", 1) for e in pairs(words, "-e"))
    assert env["PYTHONNOUSERSITE"] == "1"
    for name in ("HF_DATASETS_CACHE", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "MIOPEN_USER_DB_PATH"):
        assert env[name].startswith("/tmp/forgepipe-tester-"), name
    assert env["HF_HOME"] == str(tmp_path / "home" / ".cache" / "huggingface")
    assert not any(k.startswith(("NCCL_", "FI_CXI")) for k in env)
    # What the MLflow run records about the image and the GPU kind.
    assert env["FORGEPIPE_IMAGE"] == "forgepipe:rocm" and env["FORGEPIPE_GPU_KIND"] == "amd"
    assert pairs(words, "--user") == [f"{os.getuid()}:{os.getgid()}"]


def test_nvidia_dry_run_prints_the_cuda_docker_command(tmp_path, stage_args):
    args, _ = stage_args
    words = command(run(["--gpu", "nvidia", "--gpus", "1", "--dry-run", "reward", *args], tmp_path))
    assert pairs(words, "--gpus") == ["all"]
    assert "--device=/dev/kfd" not in words and "--ipc=host" in words
    i = words.index("forgepipe:cuda")
    assert words[i + 1:] == ["reward", *map(str, args)]
    env = dict(e.split("=", 1) for e in pairs(words, "-e"))
    assert env["FORGEPIPE_GPU_KIND"] == "nvidia"


def test_several_gpus_get_one_rank_each_through_forgepipes_launcher(tmp_path, stage_args):
    """Not torchrun: a SIGTERM to torchrun ended it with 1 and a traceback although the ranks wrote
    their stop checkpoint (issue 22 item 13); forgepipe.launch ends with their 85 (test_launch.py)."""
    args, _ = stage_args
    words = command(run(["--dry-run", "--gpu", "nvidia", "--gpus", "4", "sft", *args], tmp_path))
    assert pairs(words, "--entrypoint") == ["python"]
    i = words.index("forgepipe:cuda")
    assert words[i + 1:] == ["-m", "forgepipe.launch", "--nproc-per-node", "4", "sft", *map(str, args)]


def test_catalog_models_and_user_binds_are_visible(tmp_path):
    root = tmp_path / "models"
    (root / "forge-s4").mkdir(parents=True)
    catalog = tmp_path / "cat" / "mine.yaml"
    catalog.parent.mkdir()
    catalog.write_text("models:\n  forge-s4-rm: runs/reward/model\n")
    extra = tmp_path / "scratch"
    extra.mkdir()
    out = run(["--dry-run", "--gpus", "1", "sft", "--model", "forge-s", "--data", DATA, "--output-dir", "out"], tmp_path,
              {"FORGEPIPE_MODEL_ROOT": str(root), "FORGEPIPE_CATALOG": str(catalog), "FORGEPIPE_BINDS": str(extra)})
    words = command(out)
    volumes = pairs(words, "-v")
    for path in (root, catalog.parent, extra, tmp_path / "out"):
        assert f"{path}:{path}" in volumes, path
    env = dict(e.split("=", 1) for e in pairs(words, "-e"))
    assert env["FORGEPIPE_MODEL_ROOT"] == str(root) and env["FORGEPIPE_CATALOG"] == str(catalog)


def test_a_real_run_creates_the_output_directory_first_and_runs_docker(tmp_path, stage_args):
    args, _ = stage_args
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "docker.log"
    (bindir / "docker").write_text(
        "#!/bin/bash\n"
        f'if [[ "$1" == image ]]; then echo sha256:feed; exit 0; fi\n'
        f'echo "$*" > "{log}"\n'
        f'[[ -d "{tmp_path}/runs/sft" ]] && echo "output exists" >> "{log}"\n'
        "exit 7\n"
    )
    (bindir / "docker").chmod(0o755)
    out = run(["--gpus", "1", "sft", *args], tmp_path, path_dirs=[bindir])
    assert out.returncode == 7  # docker's own status comes back
    text = log.read_text()
    assert "output exists" in text and "FORGEPIPE_IMAGE=forgepipe:rocm@sha256:feed" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--gpu", "intel", "sft"], "is not amd, nvidia or none"), (["train"], "unknown stage 'train'"),
     (["--gpus", "zero", "sft"], "is not a positive number"), (["--lr", "1", "sft"], "unknown option --lr")],
)
def test_bad_arguments_stop_with_one_line(tmp_path, args, message):
    out = run(["--dry-run", *args], tmp_path)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


@pytest.mark.parametrize("with_forgepipe", [False, True])
def test_a_relative_sqlite_store_is_bound_under_the_working_directory(tmp_path, stage_args, with_forgepipe):
    """sqlite:///mlruns/mlflow.db is ./mlruns (forgepipe's tracking.absolute_uri): it was bound and
    created as /mlruns. With a forgepipe on PATH the paths come from `forgepipe config paths`."""
    args, _ = stage_args
    bindir = ROOT / ".venv" / "bin"
    out = run(["--dry-run", "--gpus", "1", "sft", *args, "--tracking-uri", "sqlite:///mlruns/mlflow.db"], tmp_path,
              path_dirs=[bindir] if with_forgepipe else [])
    volumes = pairs(command(out), "-v")
    store = os.path.realpath(tmp_path / "mlruns")
    assert f"{store}:{store}" in volumes and "/mlruns:/mlruns" not in volumes
    assert f"# created before the run: {store}" in out.stdout
    assert ("from forgepipe config paths" in out.stdout) == with_forgepipe
