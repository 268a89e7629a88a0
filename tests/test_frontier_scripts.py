"""Frontier job scripts: lint, the checks that stop a bad submission, and the --dry-run output.

The scripts run for real under bash. `sbatch` and `srun` are put on PATH as recorders only to
prove that nothing was submitted or launched when a setting is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
SCRIPTS = sorted(
    [
        *ROOT.glob("scripts/frontier/*.sh"),
        *ROOT.glob("scripts/frontier/*.sbatch"),
        *ROOT.glob("scripts/ci/*.sh"),
        *ROOT.glob("scripts/local/*.sh"),
        *ROOT.glob("containers/*.sh"),
        ROOT / "containers" / "march-cc",
    ]
)
SUBMIT = ROOT / "scripts" / "frontier" / "submit.sh"
DATA = ROOT / "examples" / "data" / "sample_pairs.jsonl"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return str(path)


@pytest.fixture
def recorder(tmp_path):
    """A PATH dir whose sbatch/srun/apptainer only record that they were called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "called"
    for name in ("sbatch", "srun", "apptainer"):
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        script.chmod(0o755)
    # `apptainer exec [--bind B] IMAGE forgepipe config paths ...` (the path listing at submit time)
    # runs this checkout's forgepipe, its binds recorded apart; a dry run's `config show` is skipped
    # (it imports torch: seconds).
    (bindir / "apptainer").write_text(
        "#!/bin/bash\n"
        'if [[ "$1" == exec && " $* " == *" forgepipe config show "* ]]; then echo "(config show)"; exit 0; fi\n'
        'if [[ "$1" == exec && " $* " == *" forgepipe config "* ]]; then\n'
        f'    echo "$*" >> "{tmp_path}/lister"\n'
        '    while [[ "$1" != forgepipe ]]; do shift; done\n'
        f'    shift; exec "{BIN}/forgepipe" "$@"\n'
        "fi\n"
        f'echo "apptainer $*" >> "{log}"\n'
    )
    return bindir, log


def run(args, env_extra, bindir, cwd=None):
    env = {"PATH": f"{bindir}:{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "USER": "tester"}
    env.update(env_extra)
    return subprocess.run(
        ["bash", *map(str, args)], env=env, capture_output=True, text=True, cwd=cwd or ROOT, timeout=120
    )


@pytest.fixture
def image(tmp_path):
    sif = tmp_path / "forge.sif"
    sif.write_bytes(b"SIF")
    return sif


def fake_libfabric(root: Path, version: str) -> Path:
    """A Cray libfabric module's lib64 directory (/opt/cray/libfabric/<version>/lib64)."""
    lib64 = root / "cray" / "libfabric" / version / "lib64"
    lib64.mkdir(parents=True, exist_ok=True)
    (lib64 / "libfabric.so.1").write_bytes(b"")
    return lib64


def model_dir(path: Path) -> Path:
    """A directory forgepipe's pre-launch checks take for a causal LM."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}')
    return path


def full_settings(image, tmp_path):
    return {
        "ACCOUNT": "abc123",
        "IMAGE": str(image),
        "MODEL": str(model_dir(tmp_path)),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(tmp_path / "out"),
        # `module load libfabric` puts its lib64 on LD_LIBRARY_PATH; the job inherits it.
        "LD_LIBRARY_PATH": f"{fake_libfabric(tmp_path, '2.1.0')}:/opt/cray/pe/lib64",
    }


def test_shellcheck_every_script():
    assert len(SCRIPTS) >= 12
    # `make lint` checks the same files.
    makefile = (ROOT / "Makefile").read_text()
    for script in SCRIPTS:
        rel = script.relative_to(ROOT)
        assert str(rel) in makefile or f"{rel.parent}/*{script.suffix}" in makefile, rel
    out = subprocess.run(
        [tool("shellcheck"), "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", ["containers/Dockerfile.rocm", "containers/Dockerfile.cuda"])
def test_hadolint_dockerfile(dockerfile):
    out = subprocess.run([tool("hadolint"), dockerfile], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert dockerfile in (ROOT / "Makefile").read_text()  # and `make lint` runs it


@pytest.mark.parametrize(
    ("stage", "drop", "message"),
    [
        ("sft", "ACCOUNT", "missing setting ACCOUNT"),
        ("sft", "IMAGE", "missing setting IMAGE"),
        ("sft", "MODEL", "missing setting MODEL"),
        ("reward", "DATA", "missing setting DATA"),
        ("pipeline", "OUTPUT_DIR", "missing setting OUTPUT_DIR"),
        ("ppo", "REWARD_MODEL", "missing setting REWARD_MODEL"),
        ("pipeline", "REWARD_MODEL", "missing setting REWARD_MODEL"),
        ("dpo", "MODEL", "missing setting MODEL"),
    ],
)
def test_submit_names_the_missing_setting_and_submits_nothing(
    stage, drop, message, recorder, image, tmp_path
):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "REWARD_MODEL": str(tmp_path)}
    settings.pop(drop)
    out = run([SUBMIT, stage], settings, bindir)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert message in out.stderr
    assert not log.exists()


def test_submit_reports_a_missing_image_file_as_such(recorder, tmp_path, image):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "IMAGE": str(tmp_path / "nowhere" / "forge.sif")}
    out = run([SUBMIT, "sft"], settings, bindir)
    assert out.returncode == 2
    assert f"IMAGE: no image file at {tmp_path / 'nowhere' / 'forge.sif'}" in out.stderr
    assert not log.exists()


def test_batch_script_stops_before_srun_without_a_setting(recorder, image, tmp_path):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "FORGEPIPE_ROOT": str(ROOT), "SLURM_JOB_NUM_NODES": "1"}
    settings.pop("DATA")
    out = run([ROOT / "scripts" / "frontier" / "sft.sbatch"], settings, bindir, cwd=tmp_path)
    assert out.returncode == 2
    assert "missing setting DATA" in out.stderr
    assert not log.exists()


def test_batch_script_outside_the_checkout_asks_for_forgepipe_root(recorder, tmp_path):
    bindir, _ = recorder
    out = run(
        [ROOT / "scripts" / "frontier" / "reward.sbatch"],
        {"SLURM_SUBMIT_DIR": str(tmp_path)},
        bindir,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "missing setting FORGEPIPE_ROOT" in out.stderr


def test_submit_runs_sbatch_with_the_settings(recorder, image, tmp_path):
    bindir, log = recorder
    settings = {
        **full_settings(image, tmp_path),
        "NODES": "4",
        "WALLTIME": "01:30:00",
        "LOG_DIR": str(tmp_path),
    }
    out = run([SUBMIT, "sft", "--lr", "1e-5"], settings, bindir)
    assert out.returncode == 0, out.stderr
    (call,) = log.read_text().splitlines()
    assert call.startswith(
        "sbatch -A abc123 -N 4 -t 01:30:00 -J forgepipe-sft --ntasks-per-node=8 --cpus-per-task=7 "
    )
    assert call.endswith(f"{ROOT}/scripts/frontier/sft.sbatch --lr 1e-5")


def dry_run(settings, bindir, *args, stage="sft"):
    out = run([SUBMIT, stage, "--dry-run", *args], settings, bindir)
    lines = out.stdout.splitlines()
    srun = next((line for line in lines if line.startswith("srun ")), None)
    return out, srun


def test_dry_run_prints_the_container_srun_line_and_the_resolved_config(image, tmp_path):
    pytest.importorskip("forgepipe.cli")
    bindir = tmp_path / "empty"  # no apptainer here: config resolved by the forgepipe on PATH
    bindir.mkdir()
    settings = {**full_settings(image, tmp_path), "NODES": "2"}
    out, srun = dry_run(settings, bindir, "--max-steps", "3", "--per-device-batch-size", "1")
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(
        r"srun -N 2 -n 16 --ntasks-per-node=8 -c7 --cpu-bind=cores --kill-on-bad-exit=1 --gpus-per-node=8 "
        rf"--gpu-bind=none apptainer exec --bind \S+ {re.escape(str(image))} forgepipe sft "
        rf"--model {re.escape(str(tmp_path))} --data {re.escape(str(DATA))} --output-dir \S+/out --max-steps 3 --per-device-batch-size 1",
        srun,
    ), srun
    binds = srun.split("--bind ")[1].split()[0].split(",")
    assert str(DATA.parent) in binds and str(tmp_path) in binds
    # The config is resolved for the job's world, not this one process.
    assert re.search(r"^\s+world_size: 16$", out.stdout, flags=re.M)
    assert re.search(r"^\s+max_steps: 3$", out.stdout, flags=re.M)


def test_dry_run_of_the_dpo_stage_runs_forgepipe_dpo_and_resolves_its_config(image, tmp_path):
    pytest.importorskip("forgepipe.cli")
    bindir = tmp_path / "empty"
    bindir.mkdir()
    out, srun = dry_run(full_settings(image, tmp_path), bindir, "--beta", "0.2", stage="dpo")
    assert out.returncode == 0, out.stderr
    assert f" forgepipe dpo --model {tmp_path} " in srun and srun.endswith("--beta 0.2")
    assert re.search(r"^\s+beta: 0.2$", out.stdout, flags=re.M)  # `config show --stage dpo`, job's world


def test_dry_run_direct_cpu_shape_has_no_gpu_flags(tmp_path, image):
    pytest.importorskip("forgepipe.cli")
    settings = {
        **full_settings(image, tmp_path),
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
    }
    settings.pop("IMAGE")
    out, srun = dry_run(settings, tmp_path)
    assert out.returncode == 0, out.stderr
    assert srun.startswith(
        "srun -N 1 -n 2 --ntasks-per-node=2 -c1 --cpu-bind=cores --kill-on-bad-exit=1 forgepipe sft "
    )
    assert "--gpu" not in srun and "apptainer" not in srun


def test_zeropp_defaults_hpz_to_the_gpus_of_a_node(image, tmp_path):
    settings = {**full_settings(image, tmp_path), "ZEROPP": "1", "GPUS_PER_NODE": "4"}
    _, srun = dry_run(settings, tmp_path)
    assert srun.endswith("--zeropp --hpz-size 4")
    _, srun = dry_run({**settings, "ZEROPP": "0"}, tmp_path, "--zeropp", "--hpz-size", "2")
    assert srun.endswith("--zeropp --hpz-size 2") and srun.count("--hpz-size") == 1


def test_qgz_is_refused_when_each_rank_sees_one_gcd(image, tmp_path):
    settings = {**full_settings(image, tmp_path), "FORGEPIPE_GPU_BIND": "closest"}
    out, srun = dry_run(settings, tmp_path, "--zeropp")
    assert out.returncode == 2 and srun is None
    assert "qgZ" in out.stderr and "FORGEPIPE_GPU_BIND=all" in out.stderr
    # hpZ and qwZ alone are fine under the one-GCD binding.
    _, srun = dry_run(settings, tmp_path, "--zeropp", "--no-quantized-gradients")
    assert "--gpu-bind=closest" in srun


# --- Walltime: the batch script's stop-and-resubmit logic, with srun and sbatch as stand-ins ---------


@pytest.fixture
def job(tmp_path):
    """Run sft.sbatch as Slurm would (job 4242) with a stand-in srun; sbatch records its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $* RESUME=$RESUME COUNT=$FORGEPIPE_RESUBMIT_COUNT" >> "{calls}"\n'
        'echo "Submitted batch job 4243"\n'
    )
    # srun: writes a checkpoint marker (unless FAKE_SRUN_CKPT=0) and exits with $FAKE_SRUN_RC, or,
    # with FAKE_SRUN_WAIT=1, runs until SIGUSR1 and then exits with $FAKE_SRUN_RC as forgepipe's stop does.
    (bindir / "srun").write_text(
        f'#!/bin/bash\necho "srun $*" >> "{calls}"\n'
        'if [[ -n "${FAKE_SRUN_LINES:-}" ]]; then IFS="|" read -r -a lines <<< "$FAKE_SRUN_LINES"; printf "%s\\n" "${lines[@]}"; fi\n'
        'if [[ "${FAKE_SRUN_CKPT:-1}" == 1 ]]; then\n'
        '    mkdir -p "$OUTPUT_DIR/checkpoints" && echo \'{"tag": "step-00000001"}\' > "$OUTPUT_DIR/checkpoints/latest"\n'
        "fi\n"
        'if [[ "${FAKE_SRUN_WAIT:-0}" == 1 ]]; then\n'
        f'    trap \'echo "srun got USR1" >> "{calls}"; exit "$FAKE_SRUN_RC"\' USR1\n'
        f'    echo started > "{tmp_path}/srun-started"\n'
        "    while :; do sleep 0.05; done\n"
        "fi\n"
        'exit "$FAKE_SRUN_RC"\n'
    )
    for name in ("sbatch", "srun"):
        (bindir / name).chmod(0o755)
    settings = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "USER": "tester",
        "FORGEPIPE_ROOT": str(ROOT),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "FORGEPIPE_LAUNCHER": "direct",
        "FORGEPIPE_DEVICE": "cpu",
        "GPUS_PER_NODE": "2",
        "CPUS_PER_TASK": "1",
        "ACCOUNT": "abc123",
        "WALLTIME": "00:30:00",
        "LOG_DIR": str(tmp_path),
        "SBATCH_ARGS": "--wait -p batch",
        "MODEL": str(tmp_path),
        "DATA": str(DATA),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }

    def start(rc: int, *args: str, wait: bool = False, **extra: str) -> subprocess.Popen:
        env = {**settings, "FAKE_SRUN_RC": str(rc), "FAKE_SRUN_WAIT": "1" if wait else "0", **extra}
        return subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "frontier" / "sft.sbatch"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            start_new_session=True,
        )

    def sbatch_calls() -> list[str]:
        lines = calls.read_text().splitlines() if calls.exists() else []
        return [line for line in lines if line.startswith("sbatch ")]

    return start, sbatch_calls, calls, tmp_path


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its stand-in srun
        out, err = proc.communicate()
    return proc.returncode, out + err


def test_a_run_stopped_with_85_resubmits_the_job_after_itself(job):
    start, sbatch_calls, _, _ = job
    code, out = finish(start(85, "--lr", "1e-5", "--resume", "never", RESUME="never"))
    assert code == 85, out
    (call,) = sbatch_calls()
    assert call.startswith(
        "sbatch -A abc123 -N 1 -t 00:30:00 -J forgepipe-sft --ntasks-per-node=2 --cpus-per-task=1 "
    )
    # The same settings and arguments, after this job, continuing from the checkpoint; no --wait.
    assert call.endswith(
        f"-p batch --dependency=afterany:4242 {ROOT}/scripts/frontier/sft.sbatch --lr 1e-5 "
        "RESUME=auto COUNT=1"
    ), call
    assert "--wait" not in call and "never" not in call
    assert "resubmitting (1 of at most 10)" in out


@pytest.mark.parametrize(
    ("rc", "extra", "resubmitted"),
    [
        (0, {}, False),  # finished
        (1, {}, False),  # failed, with no stop asked for: a person should look
        (2, {}, False),
        (85, {"FORGEPIPE_RESUBMIT_COUNT": "3", "FORGEPIPE_MAX_RESUBMITS": "3"}, False),  # the chain's limit
        (85, {"FORGEPIPE_MAX_RESUBMITS": "0"}, False),  # resubmission off
        (85, {"FORGEPIPE_RESUBMIT_COUNT": "2", "FORGEPIPE_MAX_RESUBMITS": "3"}, True),
        (85, {"FAKE_SRUN_CKPT": "0"}, False),  # no checkpoint in this job: the next would fare no better
    ],
)
def test_only_a_stopped_run_is_resubmitted_and_only_up_to_the_limit(job, rc, extra, resubmitted):
    start, sbatch_calls, _, _ = job
    code, out = finish(start(rc, **extra))
    assert code == rc, out
    assert bool(sbatch_calls()) == resubmitted, out
    if rc == 85 and not resubmitted:
        assert "not resubmitting" in out and code == 85
    if resubmitted:
        assert sbatch_calls()[0].endswith("COUNT=3")


@pytest.mark.parametrize("srun_rc", [85, 143, 138])
def test_the_walltime_warning_reaches_srun_and_the_job_continues(job, srun_rc):
    """--signal=B:USR1 signals the batch shell only: it must pass the signal to srun (which
    forwards it to the ranks) and resubmit, whether srun reports 85 or a rank it ended (143) or
    one that died of the signal while starting (138)."""
    start, sbatch_calls, calls, tmp_path = job
    proc = start(srun_rc, wait=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun-started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    assert code == 85, out  # the job's own status: stopped, to be continued
    assert "srun got USR1" in calls.read_text()
    assert "walltime warning (SIGUSR1)" in out and len(sbatch_calls()) == 1, out


def test_a_warning_after_the_run_finished_is_not_a_stop(job):
    start, sbatch_calls, _, tmp_path = job
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # srun "finishes" the run (writes the run file), then is killed by the late warning.
    srun = tmp_path / "bin" / "srun"
    srun.write_text(
        srun.read_text().replace("    while :;", f'    touch "{out_dir}/forgepipe-run.json"\n    while :;')
    )
    proc = start(138, wait=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun-started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    code, out = finish(proc)
    assert code == 138 and not sbatch_calls(), out


@pytest.mark.parametrize(
    ("settings", "lead"),
    [
        ({}, 600),  # WALLTIME 02:00:00: 10 minutes, time to checkpoint a large model
        ({"WALLTIME": "10"}, 120),  # a fifth of a short walltime, else the warning would come at once
        ({"WALLTIME": "1-00:00:00", "PARTITION": "extended"}, 600),
        ({"WALLTIME": "1:30"}, 18),
        ({"WALLTIME": "10", "FORGEPIPE_SIGNAL_LEAD": "900"}, 900),
    ],
)
def test_submit_asks_for_the_warning_and_exports_what_a_resubmission_needs(
    recorder, image, tmp_path, settings, lead
):
    bindir, log = recorder
    (bindir / "sbatch").write_text(
        f'#!/bin/sh\necho "sbatch $* WALLTIME=$WALLTIME LOG_DIR=$LOG_DIR" >> "{log}"\n'
    )
    out = run([SUBMIT, "sft"], {**full_settings(image, tmp_path), **settings}, bindir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (call,) = log.read_text().splitlines()
    walltime = settings.get("WALLTIME", "02:00:00")
    assert f" -t {walltime} " in call and f" --signal=B:USR1@{lead} " in call
    assert call.endswith(f"WALLTIME={walltime} LOG_DIR={tmp_path}")


def test_batch_scripts_ask_for_the_warning_when_submitted_with_plain_sbatch():
    for name in ("sft", "reward", "ppo", "dpo", "pipeline"):
        head = (ROOT / "scripts" / "frontier" / f"{name}.sbatch").read_text().split("\nset ")[0]
        assert "#SBATCH --signal=B:USR1@600" in head, name


# --- What the container sees: binds, library path, environment ------------------------------------

DEF = ROOT / "containers" / "Apptainer.def"


def binds_of(srun: str) -> list[str]:
    return srun.split("--bind ")[1].split()[0].split(",")


def test_catalog_model_root_catalog_and_fresh_output_dir_are_all_bound_as_given(image, tmp_path):
    """MODEL=forge-m resolves under $FORGEPIPE_MODEL_ROOT; a user catalog may name absolute paths;
    the output and tracking directories do not exist yet. Every one is bound, under the path the
    user gave (a symlinked model root is bound as the link, not its target)."""
    pytest.importorskip("forgepipe.cli")
    real_models = tmp_path / "lustre" / "models"
    model_dir(real_models / "forge-m2")
    (tmp_path / "proj").mkdir()
    model_root = tmp_path / "proj" / "models"  # a symlink, as $PROJWORK paths often are
    model_root.symlink_to(real_models)
    finals = tmp_path / "elsewhere" / "forge-m2-final"
    finals.mkdir(parents=True)
    catalog = tmp_path / "catalogs" / "mine.yaml"
    catalog.parent.mkdir()
    catalog.write_text(f"models:\n  forge-m2-final: {{path: {finals}, params: 13B}}\n  forge-s4-rm: runs/reward/model\n")
    output = tmp_path / "fresh" / "runs" / "sft"
    mlruns = tmp_path / "fresh" / "mlruns"
    settings = {
        **full_settings(image, tmp_path),
        "MODEL": "forge-m",
        "OUTPUT_DIR": str(output),
        "TRACKING_URI": f"sqlite:///{mlruns}/mlflow.db",
        "FORGEPIPE_MODEL_ROOT": str(model_root),
        "FORGEPIPE_CATALOG": str(catalog),
    }
    out, srun = dry_run(settings, tmp_path / "nobin")
    assert out.returncode == 0, out.stderr
    binds = binds_of(srun)
    for path in (model_root, catalog.parent, finals, output, mlruns, DATA.parent):
        assert str(path) in binds, (path, binds)
    assert str(real_models) not in binds  # bound as given, not resolved
    # The dry run lists them and what the job will create, and creates nothing.
    for path in (model_root, catalog.parent, output):
        assert f"#   {path}\n" in out.stdout
    assert f"# created by the job before srun: {output}" in out.stdout
    assert f"# created by the job before srun: {mlruns}" in out.stdout
    assert not (tmp_path / "fresh").exists()
    assert "# resolved config (forgepipe config show):" in out.stdout  # forge-m resolved under the root


def test_paths_in_the_users_own_options_are_bound_too(image, tmp_path):
    extra_data = tmp_path / "more" / "docs.jsonl"
    extra_data.parent.mkdir()
    extra_data.write_text('{"text": "x"}\n')
    cache = tmp_path / "tokcache"
    out, srun = dry_run(
        {**full_settings(image, tmp_path), "REWARD_MODEL": str(tmp_path)}, tmp_path, "--unsupervised-data",
        str(extra_data), f"--cache-dir={cache}", "--resume", "auto", stage="ppo",
    )
    binds = binds_of(srun)
    assert str(extra_data.parent) in binds and str(cache) in binds
    assert "auto" not in " ".join(binds)


@pytest.fixture
def job_binds(tmp_path, image):
    """sft.sbatch with the container launcher and a stand-in srun that reports what exists."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "srun.log"
    (bindir / "srun").write_text(
        f'#!/bin/bash\necho "srun $*" >> "{log}"\n'
        f'for d in "$OUTPUT_DIR" "{tmp_path}/fresh/mlruns"; do [[ -d "$d" ]] && echo "exists $d" >> "{log}"; done\n'
        f'echo "image $APPTAINERENV_FORGEPIPE_IMAGE hf $APPTAINERENV_HF_HOME" >> "{log}"\n'
        'exit 0\n'
    )
    (bindir / "srun").chmod(0o755)
    settings = {
        **full_settings(image, tmp_path),
        "FORGEPIPE_ROOT": str(ROOT),
        "SLURM_JOB_ID": "5151",
        "SLURM_JOB_NUM_NODES": "1",
        "OUTPUT_DIR": str(tmp_path / "fresh" / "out"),
        "TRACKING_URI": f"sqlite:///{tmp_path}/fresh/mlruns/mlflow.db",
    }
    return bindir, log, settings


def test_the_job_creates_what_the_stage_writes_before_apptainer_binds_it(job_binds, tmp_path):
    bindir, log, settings = job_binds
    out = run([ROOT / "scripts" / "frontier" / "sft.sbatch"], settings, bindir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = log.read_text()
    assert f"exists {tmp_path}/fresh/out" in text and f"exists {tmp_path}/fresh/mlruns" in text
    srun = text.splitlines()[0]
    assert f"{tmp_path}/fresh/out" in binds_of(srun) and f"{tmp_path}/fresh/mlruns" in binds_of(srun)
    # The run records the image as named, and gets the job's own cache directories.
    assert f"image {settings['IMAGE']} hf /tmp/forgepipe-tester-5151/hf" in text


def source_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment after sourcing env.sh as a batch job does."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "USER": "tester", **extra}
    out = subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{ROOT}/scripts/frontier/env.sh"; env -0'],
        env=env, capture_output=True, text=True, check=True,
    )
    return dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)


def container_env(host: dict[str, str], base_image_env: dict[str, str]) -> dict[str, str]:
    """What Apptainer (>= 1.1, action script) builds in the container: clear the host environment,
    the base image's ENV, the def file's %environment, /.singularity.d/libs appended, then the
    APPTAINERENV_ variables exported in double quotes (evaluated in the container; LD_LIBRARY_PATH
    gets /.singularity.d/libs appended), then host variables the image did not set."""
    environment = re.search(r"^%environment\n(.*?)^%", DEF.read_text(), flags=re.S | re.M).group(1)
    environment = re.sub(r"\{\{\s*\w+\s*\}\}", "x", environment)
    lines = [f"export {k}={shlex.quote(v)}" for k, v in base_image_env.items()]
    lines += [environment, 'export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/.singularity.d/libs"']
    for key, value in host.items():
        if key.startswith("APPTAINERENV_"):
            name = key[len("APPTAINERENV_"):]
            if name == "LD_LIBRARY_PATH":
                value += ":/.singularity.d/libs"
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'export {name}="{escaped}"')
    lines.append("env -0")
    out = subprocess.run(["bash", "-c", "\n".join(lines)], env={"PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True)
    inside = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    for key, value in host.items():  # restore_env: host variables the image did not define
        inside.setdefault(key, value)
    return inside


def test_the_container_library_path_extends_the_images_with_the_modules_libfabric_first(tmp_path):
    module = fake_libfabric(tmp_path, "1.22.0")
    fake_libfabric(tmp_path, "2.3.1")  # newer on disk, not loaded: never picked
    host = source_env({
        "LD_LIBRARY_PATH": f"/opt/cray/pe/lib64:{module}",
        "NODES": "2",
        "SLURM_JOB_ID": "77",
        # A host rccl-net-plugin module points RCCL at a path that does not exist in the image.
        "NCCL_NET_PLUGIN": "/sw/frontier/rccl-net-plugin/lib/librccl-net.so",
    })
    assert host["FORGEPIPE_LIBFABRIC_DIR"] == str(module)
    inside = container_env(host, {"LD_LIBRARY_PATH": "/opt/ompi/lib:/usr/local/lib"})
    path = inside["LD_LIBRARY_PATH"].split(":")
    assert path[0] == str(module)
    for kept in ("/opt/ompi/lib", "/usr/local/lib", "/opt/rocm/lib", "/opt/aws-ofi-nccl/lib", "/opt/libfabric/lib"):
        assert kept in path, (kept, path)
    # The host libfabric before the image's own; the image's base path before its additions.
    assert path.index(str(module)) < path.index("/opt/libfabric/lib")
    assert path.index("/opt/ompi/lib") < path.index("/opt/rocm/lib") < path.index("/opt/aws-ofi-nccl/lib")
    assert inside["NCCL_NET_PLUGIN"] == "/opt/aws-ofi-nccl/lib/librccl-net.so"
    # The job's settings win over the image's defaults.
    assert inside["MIOPEN_USER_DB_PATH"] == "/tmp/forgepipe-tester-77/miopen"
    assert inside["NCCL_NET"] == "OFI" and inside["FI_MR_CACHE_MONITOR"] == "kdreg2"


def test_every_variable_the_image_sets_is_passed_so_that_the_jobs_value_wins():
    image_sets = set(re.findall(r"^\s*export (\w+)=", re.search(r"^%environment\n(.*?)^%", DEF.read_text(),
                                                                   flags=re.S | re.M).group(1), flags=re.M))
    host = source_env({"NODES": "2", "SLURM_JOB_ID": "1", "FORGEPIPE_LIBFABRIC_DIR": "/opt/cray/libfabric/x/lib64"})
    passed = {k[len("APPTAINERENV_"):] for k in host if k.startswith("APPTAINERENV_")}
    assert image_sets - {"FORGEPIPE_GIT_COMMIT", "FORGEPIPE_IMAGE_BUILD", "FORGEPIPE_BASE_IMAGE_DIGEST"} <= passed


def test_caches_and_home_are_node_local_and_job_scoped():
    host = source_env({"SLURM_JOB_ID": "4242"})
    job_tmp = "/tmp/forgepipe-tester-4242"
    assert host["FORGEPIPE_NODE_TMP"] == job_tmp
    for name, sub in [("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf-datasets"), ("TRITON_CACHE_DIR", "triton"),
                      ("TORCH_EXTENSIONS_DIR", "torch-extensions"), ("MIOPEN_USER_DB_PATH", "miopen")]:
        assert host[name] == f"{job_tmp}/{sub}", name
        assert host[f"APPTAINERENV_{name}"] == host[name]
    assert host["PYTHONNOUSERSITE"] == "1" and host["APPTAINERENV_PYTHONNOUSERSITE"] == "1"
    # A setting of the user's own wins.
    assert source_env({"SLURM_JOB_ID": "1", "HF_HOME": "/lustre/hf"})["APPTAINERENV_HF_HOME"] == "/lustre/hf"


def test_system_libraries_for_the_host_libfabric_come_from_ldd_without_the_c_runtime(tmp_path):
    module = fake_libfabric(tmp_path, "1.22.0")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ldd").write_text(
        "#!/bin/sh\n"
        "echo '\tlinux-vdso.so.1 (0x00007ffd)'\n"
        "echo '\tlibc.so.6 => /lib64/libc.so.6 (0x1)'\n"
        "echo '\tlibcurl.so.4 => /bin/sh (0x2)'\n"  # an existing file standing in for /usr/lib64/libcurl.so.4
        "echo '\tlibpthread.so.0 => /lib64/libpthread.so.0 (0x3)'\n"
    )
    (bindir / "ldd").chmod(0o755)
    host = source_env({"PATH": f"{bindir}:/usr/bin:/bin", "LD_LIBRARY_PATH": str(module), "NODES": "2"})
    libs = host.get("APPTAINER_CONTAINLIBS", "")
    assert "libc.so" not in libs and "libpthread" not in libs
    out = subprocess.run(
        ["bash", "-c", f'. "{ROOT}/scripts/frontier/env.sh"; fp_fabric_libs'],
        env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": "/tmp", "USER": "t", "LD_LIBRARY_PATH": str(module)},
        capture_output=True, text=True,
    )
    # /usr/lib64 and /lib64 only: the stand-in /bin/sh path is not a system library directory.
    assert "/bin/sh" not in out.stdout


def test_a_multi_node_container_job_needs_the_host_libfabric(recorder, image, tmp_path):
    bindir, log = recorder
    settings = {**full_settings(image, tmp_path), "NODES": "2", "LD_LIBRARY_PATH": "/opt/cray/pe/lib64"}
    out = run([SUBMIT, "sft"], settings, bindir)
    assert out.returncode == 2 and "missing setting FORGEPIPE_LIBFABRIC_DIR" in out.stderr
    assert "module load libfabric" in out.stderr and not log.exists()
    # One node needs no network plugin; an explicit directory is used as given.
    assert run([SUBMIT, "sft"], {**settings, "NODES": "1"}, bindir).returncode == 0
    explicit = fake_libfabric(tmp_path, "2.3.1")
    out, _ = dry_run({**settings, "FORGEPIPE_LIBFABRIC_DIR": str(explicit)}, tmp_path / "nobin")
    assert f"# container library path: {explicit}:$LD_LIBRARY_PATH" in out.stdout


# --- RCCL's libfabric plugin: the job stops with the cause instead of hanging -----------------------

OFI_OK = "|".join([
    "n1:10:10 [0] NCCL INFO NCCL version 2.22.3+hip6.4",
    "n1:10:20 [0] NCCL INFO NET/Plugin: Loaded net plugin OFI (v9)",
    "n1:10:20 [0] NCCL INFO NET/OFI Selected provider is cxi, fabric is cxi (found 4 nics)",
    "n1:10:20 [0] NCCL INFO Using network OFI",
])


def ofi_job(job, rc: int, lines: str, wait: bool = False, **extra: str):
    start, sbatch_calls, calls, tmp_path = job
    env = {"FORGEPIPE_DEVICE": "gpu", "SLURM_JOB_NUM_NODES": "2", "FAKE_SRUN_LINES": lines, **extra}
    t0 = time.monotonic()
    code, out = finish(start(rc, wait=wait, **env))
    return code, out, time.monotonic() - t0, sbatch_calls()


def test_a_job_whose_plugin_loads_runs_and_says_which_line_proved_it(job):
    code, out, _, resubmitted = ofi_job(job, 0, OFI_OK)
    assert code == 0, out
    assert "NCCL INFO Using network OFI" in out  # RCCL's own lines reach the job log
    assert "RCCL is using its libfabric (OFI) plugin: Using network OFI" in out
    assert not resubmitted


@pytest.mark.parametrize(
    ("lines", "extra", "cause"),
    [
        (
            "n1:1:1 [0] NCCL INFO NET/Plugin: Could not find: librccl-net.so|n1:1:1 [0] NCCL WARN Error: network OFI not found.",
            {},
            "network plugin did not load or start",
        ),
        (
            "n1:1:1 [0] NCCL INFO NET/Plugin: Loaded net plugin OFI (v9)|n1:1:1 [0] NCCL INFO NET/OFI Selected provider is tcp, fabric is 10.0.0.0/8",
            {},
            "the 'tcp' provider, not 'cxi'",
        ),
        ("n1:1:1 [0] NCCL INFO NCCL version 2.22.3+hip6.4", {"FORGEPIPE_OFI_TIMEOUT": "2"}, "has not chosen a network"),
    ],
    ids=["plugin-missing", "wrong-provider", "silent-hang"],
)
def test_a_multi_node_job_without_the_plugin_stops_with_the_cause_instead_of_hanging(job, lines, extra, cause):
    code, out, took, resubmitted = ofi_job(job, 0, lines, wait=True, **extra)  # srun would run forever
    assert code != 0, out
    assert "multi-node run stopped:" in out and cause in out, out
    assert took < 40 and not resubmitted
    if "Could not find" in lines:
        assert "last plugin message: INFO NET/Plugin: Could not find: librccl-net.so" in out


def test_the_plugin_check_stays_off_on_one_node_and_on_request(job):
    lines = "n1:1:1 [0] NCCL INFO Using network Socket"
    code, out, _, _ = ofi_job(job, 0, lines, SLURM_JOB_NUM_NODES="1")
    assert code == 0 and "multi-node run stopped" not in out
    code, out, _, _ = ofi_job(job, 0, lines, FORGEPIPE_OFI_CHECK="0")
    assert code == 0 and "multi-node run stopped" not in out
    code, out, _, _ = ofi_job(job, 0, lines)
    assert code != 0 and "using the 'Socket' network" in out


# --- What a stage's config reads, listed by forgepipe itself (issue 22 items 5 and 6) ----------------


def lister_binds(tmp_path) -> list[list[str]]:
    """The --bind lists each containerised `forgepipe config paths` ran with (the recorder's)."""
    calls = (tmp_path / "lister").read_text().splitlines() if (tmp_path / "lister").exists() else []
    return [c.split("--bind ")[1].split()[0].split(",") if "--bind " in c else [] for c in calls]


@pytest.fixture
def config_with_paths(tmp_path, monkeypatch):
    """A YAML config naming a tokenizer and a chat template, a catalog entry under $PROJWORK, a DPO
    reference: paths no option of the submit line names."""
    proj = tmp_path / "proj"
    model_dir(proj / "models" / "mine")
    catalog = tmp_path / "catalogs" / "mine.yaml"
    catalog.parent.mkdir()
    catalog.write_text("models:\n  mine: $PROJWORK/models/mine\n")
    tok = tmp_path / "tokenizers" / "tok"
    tok.mkdir(parents=True)
    template = tmp_path / "templates" / "chatml.jinja"
    template.parent.mkdir()
    template.write_text("{{ messages }}")
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text(f"model:\n  tokenizer: {tok}\ndata:\n  chat_template: {template}\n")
    ref = model_dir(tmp_path / "refs" / "sft")
    reads = {"model": proj / "models" / "mine", "tokenizer": tok, "template": template.parent, "config": config.parent,
             "catalog": catalog.parent}
    settings = {"MODEL": "mine", "REWARD_MODEL": "mine", "PROJWORK": str(proj), "FORGEPIPE_CATALOG": str(catalog),
                "CONFIG": str(config)}
    return settings, reads, ref


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo", "pipeline"])
def test_the_dry_run_of_every_stage_binds_every_path_its_config_reads(stage, recorder, image, tmp_path,
                                                                       config_with_paths):
    """forgepipe lists the paths (`forgepipe config paths`, in the image, at submit time): those in the
    --config YAML, a catalog entry with $VARS, DPO's --ref; the bash no longer guesses from flags."""
    bindir, log = recorder
    extra, reads, ref = config_with_paths
    args = ("--ref", str(ref)) if stage == "dpo" else ()
    out, srun = dry_run({**full_settings(image, tmp_path), **extra}, bindir, *args, stage=stage)
    assert out.returncode == 0, out.stderr
    binds = binds_of(srun)
    expected = [reads["model"], reads["tokenizer"], reads["template"], tmp_path / "out"]
    if stage == "dpo":
        expected.append(ref)
    for path in expected:
        assert str(path) in binds, (path, binds)
    assert "from forgepipe config paths:" in out.stdout
    assert f"#   read data.chat_template {reads['template']}/chatml.jinja\n" in out.stdout
    # The image's forgepipe read the config and the catalog: their directories were bound for it.
    first = lister_binds(tmp_path)[0]
    assert str(reads["config"]) in first and str(reads["catalog"]) in first
    assert not log.exists()  # nothing submitted


def test_the_job_lists_the_paths_again_and_binds_them(job_binds, tmp_path, config_with_paths):
    """A job (plain sbatch, or a resubmission) computes its binds itself, with the same listing."""
    bindir, log, settings = job_binds
    extra, reads, _ = config_with_paths
    out = run([ROOT / "scripts" / "frontier" / "sft.sbatch"], {**settings, **extra}, bindir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    binds = binds_of(log.read_text().splitlines()[0])
    for key in ("model", "tokenizer", "template"):
        assert str(reads[key]) in binds, (key, binds)


@pytest.mark.parametrize("lister", [True, False], ids=["forgepipe-lists", "flags-only"])
def test_a_relative_sqlite_store_is_bound_where_forgepipe_opens_it(lister, recorder, image, tmp_path):
    """sqlite:///mlruns/mlflow.db (three slashes) is ./mlruns, resolved against the working directory
    as forgepipe resolves it; it was bound (and created) as /mlruns."""
    bindir, _ = recorder
    settings = {**full_settings(image, tmp_path), "TRACKING_URI": "sqlite:///mlruns/mlflow.db"}
    if not lister:  # no apptainer, no forgepipe: the command line's options are all there is
        (bindir / "apptainer").unlink()
        settings["FORGEPIPE_BIN"] = "no-such-forgepipe"
        (bindir / "forgepipe").write_text("#!/bin/sh\necho '(config show)'\n")  # the dry run's last step
        (bindir / "forgepipe").chmod(0o755)
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = run([SUBMIT, "sft", "--dry-run"], settings, bindir, cwd=cwd)
    srun = next(line for line in out.stdout.splitlines() if line.startswith("srun "))
    store = os.path.realpath(cwd / "mlruns")
    assert store in binds_of(srun) and "/mlruns" not in binds_of(srun)
    assert f"# created by the job before srun: {store}\n" in out.stdout
    assert ("from forgepipe config paths" in out.stdout) == lister


def test_a_failed_listing_stops_the_submission_in_one_line(recorder, image, tmp_path):
    bindir, log = recorder
    out = run([SUBMIT, "sft", "--no-such-option"], full_settings(image, tmp_path), bindir)
    assert out.returncode == 2 and not log.exists()
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "cannot list the paths the sft stage reads and writes" in out.stderr



# --- Frontier's scheduling policy, checked before sbatch (issue 22 item 4) ----------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"NODES": "8", "WALLTIME": "06:00:00"}, "WALLTIME 06:00:00 is over Frontier's 2 h for 1-91 nodes (NODES=8)"),
        ({"NODES": "92", "WALLTIME": "12:00:00"}, "over Frontier's 6 h for 92-183 nodes"),
        ({"NODES": "200", "WALLTIME": "1-00:00:00"}, "over Frontier's 12 h for 184-9408 nodes"),
        ({"NODES": "65", "WALLTIME": "20:00:00", "PARTITION": "extended"}, "extended partition takes at most 64 nodes"),
        ({"NODES": "1", "WALLTIME": "03:00:00", "QOS": "debug"}, "over the debug QOS's 2 h"),
        ({"NODES": "1", "WALLTIME": "01:00:00", "SBATCH_ARGS": "-q debug --dependency=afterok:1"},
         "forbids chained (dependent) jobs in the debug QOS"),
        ({"NODES": "1", "SBATCH_ARGS": "-t 4:00:00"}, "WALLTIME 4:00:00 is over Frontier's 2 h"),
        ({"NODES": "1", "WALLTIME": "2h"}, "WALLTIME='2h' is not a walltime sbatch reads"),
    ],
)
def test_submit_refuses_a_job_frontier_would_refuse_in_one_line(settings, message, recorder, image, tmp_path):
    bindir, log = recorder
    out = run([SUBMIT, "sft"], {**full_settings(image, tmp_path), **settings}, bindir)
    assert out.returncode == 2 and not log.exists(), out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr, out.stderr


@pytest.mark.parametrize(
    "settings",
    [
        {"NODES": "8", "WALLTIME": "02:00:00"},
        {"NODES": "92", "WALLTIME": "06:00:00"},
        {"NODES": "184", "WALLTIME": "12:00:00"},
        {"NODES": "64", "WALLTIME": "1-00:00:00", "PARTITION": "extended"},
        {"NODES": "9408", "WALLTIME": "12:00:00"},
    ],
)
def test_submit_accepts_every_bin_up_to_its_limit(settings, recorder, image, tmp_path):
    bindir, log = recorder
    out = run([SUBMIT, "sft"], {**full_settings(image, tmp_path), **settings}, bindir)
    assert out.returncode == 0, out.stderr
    assert f" -N {settings['NODES']} -t {settings['WALLTIME']} " in log.read_text()


def test_a_debug_job_runs_without_a_resubmission_chain(recorder, image, tmp_path):
    bindir, log = recorder
    (bindir / "sbatch").write_text(f'#!/bin/sh\necho "sbatch $* MAX=$FORGEPIPE_MAX_RESUBMITS" >> "{log}"\n')
    settings = {**full_settings(image, tmp_path), "NODES": "2", "WALLTIME": "00:20:00", "QOS": "debug"}
    out = run([SUBMIT, "sft"], settings, bindir)
    assert out.returncode == 0, out.stderr
    assert " -q debug " in log.read_text() and log.read_text().strip().endswith("MAX=0")


def test_a_job_in_the_debug_qos_never_resubmits_itself(job):
    start, sbatch_calls, _, _ = job
    code, out = finish(start(85, SLURM_JOB_QOS="debug"))
    assert code == 85 and not sbatch_calls(), out
    assert "forbids chained jobs in the debug QOS" in out


def test_the_readme_frontier_example_is_a_job_frontier_accepts(recorder, image, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running on Frontier")[1].split("\n## ")[0]
    example = re.search(r"^export MODEL=.*$", section, flags=re.M).group(0)
    settings = dict(re.findall(r"\b(NODES|WALLTIME|PARTITION|QOS)=(\S+)", example))
    assert "NODES" in settings and "WALLTIME" in settings, example
    bindir, _ = recorder
    out = run([SUBMIT, "sft"], {**full_settings(image, tmp_path), **settings}, bindir)
    assert out.returncode == 0, out.stderr


# --- Jobs: offline, per-job caches, derived settings recomputed, clean container (issue 22 item 8) -


def submitted_env(tmp_path, login: dict[str, str]) -> dict[str, str]:
    """The environment sbatch hands the job: submit.sh's own, after env.sh on the login node."""
    bindir = tmp_path / "submit-bin"
    bindir.mkdir(exist_ok=True)
    dump = tmp_path / "job-env"
    (bindir / "sbatch").write_text(f'#!/bin/sh\nenv -0 > "{dump}"\n')
    (bindir / "sbatch").chmod(0o755)
    out = run([SUBMIT, "sft"], login, bindir)
    assert out.returncode == 0, out.stderr
    return dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)


def test_a_job_recomputes_what_env_sh_derived_on_the_login_node(image, tmp_path):
    login_module = fake_libfabric(tmp_path / "login", "2.1.0")
    settings = {**full_settings(image, tmp_path), "NODES": "2", "LD_LIBRARY_PATH": str(login_module),
                "TRITON_CACHE_DIR": "/lustre/me/triton"}  # set by the user: kept
    exported = submitted_env(tmp_path, settings)
    assert exported["HF_HOME"] == "/tmp/forgepipe-tester-local/hf"  # what the login node derived
    job_module = fake_libfabric(tmp_path / "job", "2.2.0")
    job = source_env({**exported, "SLURM_JOB_ID": "9001", "SLURM_JOB_NUM_NODES": "2", "LD_LIBRARY_PATH": str(job_module)})
    assert job["HF_HOME"] == job["APPTAINERENV_HF_HOME"] == "/tmp/forgepipe-tester-9001/hf"
    assert job["MIOPEN_USER_DB_PATH"] == "/tmp/forgepipe-tester-9001/miopen"
    assert job["FORGEPIPE_LIBFABRIC_DIR"] == str(job_module)
    assert job["APPTAINERENV_LD_LIBRARY_PATH"].startswith(f"{job_module}:")
    assert job["TRITON_CACHE_DIR"] == job["APPTAINERENV_TRITON_CACHE_DIR"] == "/lustre/me/triton"
    # ... and a resubmitted job its own again.
    again = source_env({**job, "SLURM_JOB_ID": "9002"})
    assert again["HF_HOME"] == "/tmp/forgepipe-tester-9002/hf" and again["MASTER_PORT"] != job["MASTER_PORT"]


def test_jobs_are_offline_with_a_private_port_and_a_thread_per_core():
    for job_id in ("1", "32767", "4242424"):
        host = source_env({"SLURM_JOB_ID": job_id, "CPUS_PER_TASK": "7"})
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            assert host[name] == host[f"APPTAINERENV_{name}"] == "1", name
        port = int(host["APPTAINERENV_MASTER_PORT"])
        assert 1024 < port < 32768, port  # below Linux's ephemeral range, 32768-60999
        assert host["OMP_NUM_THREADS"] == host["APPTAINERENV_OMP_NUM_THREADS"] == "7"
    assert source_env({"SLURM_JOB_ID": "1", "HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"


def test_no_host_pythonpath_or_rocm_path_reaches_the_container():
    host = source_env({"SLURM_JOB_ID": "1", "PYTHONPATH": "/sw/cray-python/site-packages", "ROCM_PATH": "/opt/rocm-6.0.0"})
    inside = container_env(host, {"LD_LIBRARY_PATH": "/usr/local/lib"})
    assert "PYTHONPATH" not in inside and "ROCM_PATH" not in inside
    # The job's own environment keeps them with the direct launcher (a conda env in the job).
    direct = source_env({"FORGEPIPE_LAUNCHER": "direct", "PYTHONPATH": "/env/site"})
    assert direct["PYTHONPATH"] == "/env/site"


def test_a_multi_node_job_needs_libfabric_2(recorder, image, tmp_path):
    bindir, log = recorder
    old = fake_libfabric(tmp_path, "1.22.0")
    settings = {**full_settings(image, tmp_path), "NODES": "2", "LD_LIBRARY_PATH": str(old)}
    out = run([SUBMIT, "sft"], settings, bindir)
    assert out.returncode == 2 and not log.exists()
    assert f"libfabric 1.22.0 in {old}; RCCL's network plugin in the image needs libfabric >= 2.0" in out.stderr
    # fi_info beside the library is asked first.
    bin_dir = old.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "fi_info").write_text("#!/bin/sh\necho 'fi_info: 2.0.0'\necho 'libfabric: 2.0.0'\n")
    (bin_dir / "fi_info").chmod(0o755)
    assert run([SUBMIT, "sft"], settings, bindir).returncode == 0
