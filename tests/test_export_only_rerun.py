"""A rerun after the export failed exports only (issue 22 item 14): a run whose disk filled at the
export has its final checkpoint intact and no export; rerunning it resumes from that checkpoint, takes
no step, and used to rewrite the whole checkpoint (its size again in free space) before exporting,
failing again where the export alone would fit. The checkpoint this process resumed from, with no
step since, is now kept as it is. Unit level: one process, an engine stand-in that writes torch
archives as DeepSpeed's save_checkpoint lays them out; no training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgepipe import checkpoint as ck
from forgepipe.checkpoint import find_latest, load_checkpoint, save_checkpoint
from forgepipe.checkpoint_verify import verify_checkpoint


class Engine:
    """DeepSpeed's checkpoint calls, on a tensor; `full` makes every write fail as on a full disk."""

    def __init__(self, value: float):
        self.w = torch.full((4096,), value)
        self.full = False
        self.saves = 0

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool = False) -> None:
        self.saves += 1
        if self.full:
            raise OSError(28, "No space left on device")
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.w}}, Path(directory) / tag / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, directory: str, tag: str):
        self.w = torch.load(Path(directory) / tag / "mp_rank_00_model_states.pt")["module"]["w"]
        return directory, {}


@pytest.fixture(autouse=True)
def _fresh_process():
    ck._RESUMED.clear()  # each test is one launch: nothing resumed yet
    yield
    ck._RESUMED.clear()


def state(step: int, **extra) -> dict:
    return {"step": step, "epoch": 0, "position": step, "run_id": "r1", "fingerprint": {"config": {"lr": 1}},
            **extra}


def files_of(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "loop_state.json"}


def test_the_rerun_keeps_its_intact_final_checkpoint_and_writes_no_byte_of_it(tmp_path):
    out = tmp_path / "run"
    first = Engine(1.0)
    save_checkpoint({"model": first}, out, "step-00000002", state(2), keep_last=3)
    final = save_checkpoint({"model": first}, out, "step-00000004", state(4), keep_last=3)
    # ... the export failed here (a full disk). The rerun: a new process resumes from the final checkpoint.
    ck._RESUMED.clear()
    before = files_of(final)
    engine = Engine(0.0)
    assert find_latest(out) == final
    loaded = load_checkpoint({"model": engine}, final)
    assert loaded["step"] == 4 and torch.equal(engine.w, first.w)
    engine.full = True  # the disk still has room for the export only: any checkpoint write would fail
    again = save_checkpoint({"model": engine}, out, "step-00000004", state(4), keep_last=3)
    assert again == final and engine.saves == 0
    assert files_of(final) == before and verify_checkpoint(final) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]


def test_an_honoured_change_updates_only_the_loop_state(tmp_path):
    out = tmp_path / "run"
    final = save_checkpoint({"model": Engine(1.0)}, out, "step-00000004", state(4), keep_last=3)
    ck._RESUMED.clear()
    before = files_of(final)
    engine = Engine(0.0)
    load_checkpoint({"model": engine}, final)
    new = state(4, fingerprint={"config": {"lr": 2}})
    save_checkpoint({"model": engine}, out, "step-00000004", new, keep_last=3)
    assert engine.saves == 0 and files_of(final) == before and verify_checkpoint(final) is None
    written = json.loads((final / "loop_state.json").read_text())
    assert written["fingerprint"] == {"config": {"lr": 2}} and written["files"]


def test_a_step_taken_or_another_checkpoint_resumed_from_is_written_as_before(tmp_path):
    out = tmp_path / "run"
    engine = Engine(1.0)
    save_checkpoint({"model": engine}, out, "step-00000002", state(2), keep_last=3)
    ck._RESUMED.clear()
    load_checkpoint({"model": engine}, out / "checkpoints" / "step-00000002")
    engine.w += 1  # trained from step 2 to 4
    save_checkpoint({"model": engine}, out, "step-00000004", state(4), keep_last=3)
    assert engine.saves == 2
    # Resumed from step 4 but its files were damaged since: it is written anew, not kept.
    ck._RESUMED.clear()
    final = out / "checkpoints" / "step-00000004"
    load_checkpoint({"model": engine}, final)
    (final / "model" / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    save_checkpoint({"model": engine}, out, "step-00000004", state(4), keep_last=3)
    assert engine.saves == 3 and verify_checkpoint(final) is None
