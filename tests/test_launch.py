"""forgepipe.launch, the local multi-rank launcher scripts/local/run.sh uses (issue 22 item 13): a stop
signal to the launcher reaches every rank and nothing else, the ranks write their checkpoint and end
with 85, and so does the launcher, without a traceback (torchrun ended with 1 and its own traceback,
and killed the ranks 30 s after the signal). Stand-in ranks (the real handler of forgepipe.signals, a
slow "checkpoint"), so the test takes seconds; the ranks' own stop is test_resume.py's."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import child_env

from forgepipe.launch import outcome

RANK = """
import os, sys, time
from forgepipe.signals import EXIT_PREEMPTED, STOP
STOP.install()
out = sys.argv[1]
open(f"{out}/up-{os.environ['RANK']}", "w").write(os.environ["WORLD_SIZE"] + " " + os.environ["MASTER_PORT"])
if sys.argv[2] == "fail" and os.environ["RANK"] == "1":
    sys.exit(3)
while STOP.signal is None:
    time.sleep(0.05)
time.sleep(1.0)  # the stop checkpoint
open(f"{out}/checkpoint-{os.environ['RANK']}", "w").write(str(STOP.signal))
print(f"forgepipe: stopped by signal {STOP.signal} at step 1; checkpoint written, resubmit to continue",
      file=sys.stderr)
sys.exit(EXIT_PREEMPTED)
"""


def launch(tmp_path: Path, how: str) -> subprocess.Popen:
    (tmp_path / "rank.py").write_text(RANK)
    code = (f"import sys, forgepipe.launch as l; l.RANK_COMMAND = [sys.executable, {str(tmp_path / 'rank.py')!r}]; "
            f"sys.exit(l.main(['--nproc-per-node', '2', {str(tmp_path)!r}, {how!r}]))")
    return subprocess.Popen([sys.executable, "-c", code], env=child_env(), stderr=subprocess.PIPE, text=True)


def wait_for(paths: list[Path]) -> None:
    deadline = time.monotonic() + 20
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)


def test_a_stop_signal_to_the_launcher_ends_it_with_85_after_every_rank_checkpointed(tmp_path):
    proc = launch(tmp_path, "stop")
    wait_for([tmp_path / "up-0", tmp_path / "up-1"])
    assert (tmp_path / "up-0").read_text() == (tmp_path / "up-1").read_text()  # one world, one port
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 85, err
    assert "Traceback" not in err
    assert err.count("checkpoint written, resubmit to continue") == 2
    assert (tmp_path / "checkpoint-0").read_text() == (tmp_path / "checkpoint-1").read_text() == str(
        int(signal.SIGTERM))


def test_a_failing_rank_stops_the_others_and_gives_its_status(tmp_path):
    proc = launch(tmp_path, "fail")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 3, err
    assert "forgepipe: launch: rank 1 ended with status 3; the launcher exits 3" in err
    assert (tmp_path / "checkpoint-0").exists()  # rank 0 was stopped, not left waiting


def test_outcome():
    assert outcome([0, 0]) == 0
    assert outcome([85, 85]) == 85 and outcome([85, 0]) == 85
    assert outcome([85, 1]) == 1 and outcome([-9, 85]) == 137 and outcome([2, 2]) == 2
