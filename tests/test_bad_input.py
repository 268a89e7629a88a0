"""Bad input and faults, table-driven: each case is (command line, expected one-line message, what
must be left behind). Every case runs the real CLI in a fresh process and must end with exit
status 2, exactly one `forgepipe: error:` line naming the file, line or option, no traceback, no
output directory, no MLflow run, and an earlier run in the way left exactly as it was.

The cases are answered by the pre-launch checks (forgepipe/preflight.py), before DeepSpeed is
imported or a rank started; `python -m forgepipe` runs them (the __main__ module).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SAMPLE_DOCS, SAMPLE_PAIRS, child_env
from fake_servers import silent_server_port


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def pairs(n: int, start: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."}) + "\n"
                   for i in range(start, start + n))


def responses(n: int) -> str:
    return "".join(json.dumps({"prompt": f"Say {i}", "response": f"{i}"}) + "\n" for i in range(n))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS: list[subprocess.Popen] = []


def plain_http_server(directory: Path) -> int:
    """A static file server (answers 404 to MLflow's API), stopped when the module's tests end."""
    port = closed_port()
    SERVERS.append(subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                     "--directory", str(directory)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the test web server did not start")


@pytest.fixture(scope="module", autouse=True)
def _stop_servers():
    yield
    for server in SERVERS:
        server.terminate()
        server.wait()


def reward_export(tiny_model: Path, out: Path) -> Path:
    """What `forgepipe reward` exports: a sequence classifier with one label (a scalar head)."""
    if not (out / "config.json").is_file():
        from forgepipe.models.load import load_tokenizer
        from forgepipe.models.reward_model import load_scalar_model

        tok = load_tokenizer(str(tiny_model))
        load_scalar_model(str(tiny_model), dtype="fp32", tokenizer=tok).save_pretrained(out)
        tok.save_pretrained(out)
        (out / "forgepipe.json").write_text(json.dumps({"stage": "reward"}))
    return out


# name -> (stage, extra args given d = a scratch directory and m = the tiny model, expected substring)
CASES: dict[str, tuple[str, object, str]] = {
    "missing data file": ("sft", lambda d, m: ["--data", str(d / "nope.jsonl")], "nope.jsonl': file not found"),
    "non-UTF-8 data names file and line": (
        "sft", lambda d, m: ["--data", str(write(d / "latin1.jsonl", pairs(3).encode() + '{"text": "caf\xe9"}\n'
                                                  .encode("latin-1")))],
        "latin1.jsonl:4: not UTF-8 text"),
    "non-UTF-8 gzip data": (
        "sft", lambda d, m: ["--data", str(write(d / "bad.jsonl.gz", gzip.compress(b'{"text": "ok"}\n{"text": "\xff"}\n')))],
        "bad.jsonl.gz:2: not UTF-8 text"),
    "non-UTF-8 YAML config names file and line": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS),
                             "--config", str(write(d / "run.yaml", b"train:\n  lr: 1.0e-5\n  # r\xe9sum\xe9\n"))],
        "run.yaml:3: not UTF-8 text"),
    "invalid JSON line": ("sft", lambda d, m: ["--data", str(write(d / "bad.jsonl", pairs(2) + "{oops\n"))],
                          "bad.jsonl:3: invalid JSON"),
    "mixed formats above --max-dropped-fraction": (
        "sft", lambda d, m: ["--data", str(write(d / "mixed.jsonl", pairs(100) + responses(200)))],
        "mixed.jsonl: 200 of 300 rows (67%) dropped, more than --max-dropped-fraction 0.1: 200 a {prompt, response} "
        "record where the file's format is {prompt, chosen, rejected} (e.g. "),
    "zero usable rows said as such, with the reasons": (
        "reward", lambda d, m: ["--data", str(write(d / "hh.jsonl", "".join(
            json.dumps({"chosen": f"\n\nHuman: q{i} a", "rejected": f"\n\nHuman: q{i} b"}) + "\n" for i in range(30))))],
        "hh.jsonl: no usable rows, all 30 dropped: 30 HH dialogue without an"),
    "split leaves the stage nothing": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--data-split", "0,5,5"],
                                       "--data-split"),
    "too few samples for one step, before any model loads": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--per-device-batch-size", "500"],
        "--per-device-batch-size: 270 training rows of stage sft are fewer than one step"),
    "unknown model name": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--model", "forge-xl-unknown"],
                           "forge-xl-unknown"),
    "reward export as the SFT model": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--model", str(reward_export(m, d / "rm"))],
        "--model: {d}/rm is a reward model export"),
    "reward export as the PPO actor": (
        "ppo", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--actor", str(reward_export(m, d / "rm")),
                             "--reward", str(reward_export(m, d / "rm"))],
        "--actor: {d}/rm is a reward model export"),
    "plain LM as the PPO reward model": (
        "ppo", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--actor", str(m), "--reward", str(m)],
        "is a base model (causal LM), not a reward model export"),
    "--output-dir is a file": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS),
                                                    "--output-dir", str(write(d / "taken", "x"))],
                               "--output-dir: {d}/taken is a file"),
    "--lr nan": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--lr", "nan"], "--lr: must be a finite number"),
    "--lr inf": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--lr", "inf"], "--lr: must be a finite number"),
    "tracking store under a file": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--tracking-uri", f"sqlite:///{write(d / 'plain', 'x')}/m.db"],
        "--tracking-uri: {d}/plain is a file"),
    "tracking store that is not SQLite": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--tracking-uri", f"sqlite:///{write(d / 'x.db', 'text')}"],
        "--tracking-uri: {d}/x.db is not an SQLite database"),
    "unreachable tracking server, in seconds": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
        "is unreachable"),
    "a web server that is no MLflow tracking server": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--tracking-uri", f"http://127.0.0.1:{plain_http_server(d)}"],
        "is not an MLflow tracking server (GET /health: HTTP 404)"),
    "--resume of a directory that is no checkpoint": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--resume", str(write(d / "ck" / "x", "") and d / "ck")],
        "--resume: {d}/ck is not a complete forgepipe checkpoint"),
    "reward data without pairs": ("reward", lambda d, m: ["--data", str(SAMPLE_DOCS)], "no chosen/rejected pairs"),
    "missing chat template file": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--chat-template", str(d / "t.jinja")],
                                   "--chat-template: {d}/t.jinja: no such file"),
    "a conversation without the assistant's answer names its line": (
        "sft", lambda d, m: ["--data", str(write(d / "chat.jsonl", "".join(json.dumps({"messages": [
            {"role": "user", "content": f"q{i}"}, *([{"role": "assistant", "content": "a"}] if i % 2 else [])]}) + "\n"
            for i in range(20))))],
        "chat.jsonl: 10 of 20 rows (50%) dropped, more than --max-dropped-fraction 0.1: 10 'messages' does not end "
        "with an assistant message after a prompt (e.g. {d}/chat.jsonl:1)"),
    "a truncated .jsonl.gz names the file and the last line read": (
        "sft", lambda d, m: ["--data", str(truncated_gzip(d))],
        "cut.jsonl.gz: truncated gzip file, its data ends after line "),
    "an --output-dir that cannot be created (/proc)": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--output-dir", "/proc/forgepipe-bad-input/out"],
        "--output-dir: /proc/forgepipe-bad-input/out cannot be created: /proc takes no new directory"),
    "an --output-dir that cannot be created (/sys)": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--output-dir", "/sys/forgepipe-bad-input"],
        "--output-dir: /sys/forgepipe-bad-input cannot be created: /sys takes no new directory"),
    "a model directory with a truncated model.safetensors, before DeepSpeed starts": (
        "sft", lambda d, m: ["--model", str(corrupt_model(m, d / "cut-model"))],
        "--model: {d}/cut-model/model.safetensors is not a complete safetensors file (truncated: its header "
        "describes "),
    "a --chat-template with a Jinja syntax error names its line": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--chat-template",
                             str(write(d / "t.jinja", "{% for m in messages %}\n{{ m.content }\n"))],
        "--chat-template: {d}/t.jinja:2: Jinja syntax error (unexpected '}')"),
    "a --chat-template that raises on every conversation": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--chat-template",
                             str(write(d / "t.jinja", "{{ raise_exception('system message required') }}"))],
        "--chat-template: {d}/t.jinja: the template fails on a one-turn conversation (TemplateError: system "
        "message required)"),
    "a --chat-template that is not UTF-8 names its line": (
        "dpo", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--chat-template",
                             str(write(d / "t.jinja", "{% for m in messages %}\ncaf\xe9 {{ m.content }}{% endfor %}"
                                       .encode("latin-1")))],
        "--chat-template: {d}/t.jinja:2: not UTF-8 text (byte 0xe9 at column 4)"),
    "--seed outside numpy's range": ("sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--seed", "-1"],
                                     "--seed: must be in [0, 4294967295], got -1"),
    "a --tokenizer directory without a tokenizer": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--tokenizer", str(write(d / "tok" / "README", "") and d / "tok")],
        "--tokenizer: {d}/tok holds no tokenizer"),
    "dpo given documents is told what dpo needs": ("dpo", lambda d, m: ["--data", str(SAMPLE_DOCS)],
                                                   "no chosen/rejected pairs (fields: text); stage dpo needs"),
    "pairs that are all identical, not blamed on the batch size": (
        "dpo", lambda d, m: ["--data", str(write(d / "same.jsonl", "".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"A{i}"}) + "\n" for i in range(40))))],
        "same.jsonl: all 40 pairs have the same chosen and rejected text: nothing to prefer"),
    "--resume of a checkpoint whose state file is garbage of the right size": (
        "sft", lambda d, m: ["--data", str(SAMPLE_PAIRS), "--resume", str(garbage_checkpoint(d / "ck"))],
        "--resume: {d}/ck/step-00000004 cannot be resumed from: {d}/ck/step-00000004/model/mp_rank_00_model_states.pt "
        "is corrupt: not a torch archive (File is not a zip file); the newest intact checkpoint before it is "
        "{d}/ck/step-00000002 (step 2)"),
    "a FIFO as --data, refused before it is opened (it would block)": (
        "sft", lambda d, m: ["--data", str(fifo(d / "pipe.jsonl"))],
        "data source '{d}/pipe.jsonl': a FIFO (named pipe), not a regular file or directory"),
    "an empty directory as --data, in seconds": (
        "sft", lambda d, m: ["--data", str(d / "empty") if (d / "empty").mkdir() is None else ""],
        "data source '{d}/empty': an empty directory, not a data set saved by datasets' save_to_disk"),
    "a directory of data files as --data names them": (
        "sft", lambda d, m: ["--data", str(write(d / "files" / "a.jsonl", pairs(3)).parent)],
        "data source '{d}/files': a directory of data files (a.jsonl), not a data set saved by datasets' "
        "save_to_disk; give the files themselves: --data {d}/files/a.jsonl"),
}


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def garbage_checkpoint(root: Path) -> Path:
    """Checkpoints at steps 2 and 4 as save_checkpoint lays them out; step 4's model state overwritten
    with garbage of its own size (test_checkpoint_verify.py)."""
    from test_checkpoint_verify import STATE, garbage_of_the_same_size, make_checkpoint

    make_checkpoint(root, 2)
    newest = make_checkpoint(root, 4)
    garbage_of_the_same_size(newest / STATE)
    return newest


def corrupt_model(model: Path, out: Path, how: str = "truncate") -> Path:
    """A copy of `model` whose model.safetensors is cut in half, or has garbage for its header."""
    if not out.is_dir():
        shutil.copytree(model, out)
        weights = out / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 2] if how == "truncate" else data[:8] + b"\xff" * 64 + data[72:])
    return out


def truncated_gzip(d: Path) -> Path:
    return write(d / "cut.jsonl.gz", gzip.compress(pairs(400).encode())[:2000])


# Commands other than the stages: name -> (arguments given d = a scratch directory and m = the tiny
# model, expected substring, a path that must not exist afterwards or None).
COMMANDS: dict[str, tuple[object, str, str | None]] = {
    "score: a truncated .jsonl.gz": (
        lambda d, m: ["score", str(reward_export(m, d / "rm")), "--data", str(truncated_gzip(d))],
        "--data: {d}/cut.jsonl.gz: truncated gzip file, its data ends after line ", None),
    "runs compare --plot into /proc": (
        lambda d, m: ["runs", "compare", "a", "b", "--plot", "/proc/forgepipe-bad-input.png",
                      "--tracking-uri", f"sqlite:///{d}/mlflow.db"],
        "--plot: /proc/forgepipe-bad-input.png cannot be written", "{d}/mlflow.db"),
    "runs compare --plot under a file": (
        lambda d, m: ["runs", "compare", "a", "b", "--plot", str(write(d / "plain", "x") / "curves.png"),
                      "--tracking-uri", f"sqlite:///{d}/mlflow.db"],
        "--plot: {d}/plain/curves.png has a parent that is a file ({d}/plain)", "{d}/mlflow.db"),
    "runs list: a tracking server that refuses connections, in seconds": (
        lambda d, m: ["runs", "list", "--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
        "is unreachable (Connection refused, waited 3 s)", None),
    "runs list: a tracking server that accepts and never answers, in seconds": (
        lambda d, m: ["runs", "list", "--tracking-uri", f"http://127.0.0.1:{silent_server_port()}"],
        "does not answer (timed out, waited 3 s)", None),
    "runs show: a tracking server that accepts and never answers, in seconds": (
        lambda d, m: ["runs", "show", "abcd", "--tracking-uri", f"http://127.0.0.1:{silent_server_port()}"],
        "does not answer (timed out, waited 3 s)", None),
    "chat: a model directory whose model.safetensors header is garbage": (
        lambda d, m: ["chat", str(corrupt_model(m, d / "bad-model", how="garbage")), "--prompt", "hi"],
        "MODEL_DIR: {d}/bad-model/model.safetensors is not a complete safetensors file (its header is not UTF-8 "
        "JSON)", None),
}


def cli(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgepipe", *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("forgepipe: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def mlflow_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT count(*) FROM runs WHERE lifecycle_stage = 'active'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_model, tmp_path):
    stage, make_args, needle = CASES[case]
    out, db = tmp_path / "out", tmp_path / "mlruns" / "mlflow.db"
    model_flag = "--actor" if stage == "ppo" else "--model"
    args = [stage, model_flag, str(tiny_model), "--output-dir", str(out), "--tracking-uri", f"sqlite:///{db}",
            "--torch-adam", "--dtype", "fp32", *make_args(tmp_path, tiny_model)]
    if stage == "ppo" and "--reward" not in args:
        args += ["--reward", str(reward_export(tiny_model, tmp_path / "rm"))]
    error = one_error(cli(args))
    assert needle.replace("{d}", str(tmp_path)) in error, error
    assert not out.exists()
    assert mlflow_runs(db) == 0


@pytest.mark.parametrize("case", list(COMMANDS))
def test_bad_input_to_other_commands(case, tiny_model, tmp_path):
    make_args, needle, absent = COMMANDS[case]
    started = time.monotonic()
    error = one_error(cli(make_args(tmp_path, tiny_model)))
    assert needle.replace("{d}", str(tmp_path)) in error, error
    assert time.monotonic() - started < 30
    if absent:
        assert not Path(absent.replace("{d}", str(tmp_path))).exists()


def test_config_show_runs_the_same_checks(tmp_path):
    error = one_error(cli(["config", "show", "--data", str(tmp_path / "nope.jsonl")]))
    assert "nope.jsonl': file not found" in error
    error = one_error(cli(["config", "show", "--lr", "inf"]))
    assert "--lr: must be a finite number" in error


# ---------------------------------------------------------------------------
# A finished run in the way: refused without --overwrite, and left exactly as it was


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def run_record(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT run_uuid, status, end_time FROM runs ORDER BY run_uuid").fetchall()


def sft_args(model: Path, out: Path, db: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(SAMPLE_PAIRS), "--output-dir", str(out),
            "--tracking-uri", f"sqlite:///{db}", "--dtype", "fp32", "--torch-adam", "--zero-stage", "2",
            "--per-device-batch-size", "2", "--max-seq-len", "128", "--warmup-ratio", "0", "--max-steps", "2", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    out, db = root / "sft", root / "mlflow.db"
    proc = cli(sft_args(tiny_model, out, db), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, db


REFUSED_RERUNS = {
    "--resume never into a finished run": (["--resume", "never"], "holds a finished run (MLflow run "),
    "an option that cannot change on resume": (["--per-device-batch-size", "3"],
                                               "--resume: --per-device-batch-size cannot change on resume"),
    "--resume never with a bad option too": (["--resume", "never", "--lr", "nan"], "--lr: must be a finite number"),
    "a bad data file on a rerun": (["--data", "/nonexistent/x.jsonl"], "file not found"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED_RERUNS))
def test_a_finished_run_is_never_touched(case, finished, tiny_model, tmp_path):
    out, db = finished
    extra, needle = REFUSED_RERUNS[case]
    before_files, before_runs = snapshot(out), run_record(db)
    error = one_error(cli(sft_args(tiny_model, out, db, *extra)))
    assert needle in error, error
    assert snapshot(out) == before_files
    assert run_record(db) == before_runs  # still FINISHED, same end time, no new run


@pytest.mark.slow
def test_overwrite_removes_the_old_outputs_first_and_says_so(finished, tiny_model, tmp_path):
    src, src_db = finished
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    shutil.copytree(src, out)
    shutil.copy(src_db, db)
    old_run = json.loads((out / "forgepipe-run.json").read_text())["mlflow_run_id"]
    (out / "checkpoints" / "step-00009999").mkdir()  # an unrelated leftover: removed with the rest
    (out / "checkpoints" / "step-00009999" / "loop_state.json").write_text('{"step": 9999, "run_id": "x"}')
    proc = cli(sft_args(tiny_model, out, db, "--resume", "never", "--overwrite"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--overwrite: removed model, checkpoints, forgepipe-run.json, config.yaml of a finished run" in proc.stderr
    new_run = json.loads((out / "forgepipe-run.json").read_text())["mlflow_run_id"]
    assert new_run != old_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    status = dict((r[0], r[1]) for r in run_record(db))
    assert status == {old_run: "FINISHED", new_run: "FINISHED"}


@pytest.mark.slow
def test_a_run_without_its_final_checkpoint_is_finished_not_extendable(tiny_model, tmp_path):
    """--no-final-checkpoint: the export and the run file, no checkpoint; extending it is refused in
    one line before anything starts, and the finished run is left as it was."""
    out, db = tmp_path / "sft", tmp_path / "mlflow.db"
    proc = cli(sft_args(tiny_model, out, db, "--no-final-checkpoint"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model" / "model.safetensors").is_file() and (out / "forgepipe-run.json").is_file()
    assert not any((out / "checkpoints").glob("step-*"))
    before_files, before_runs = snapshot(out), run_record(db)
    error = one_error(cli(sft_args(tiny_model, out, db, "--no-final-checkpoint", "--max-steps", "3")))
    assert f"{out} holds a run that finished at step 2 without its final checkpoint" in error, error
    assert snapshot(out) == before_files and run_record(db) == before_runs
