"""Checkpoints verified by their contents, not only their sizes, without a training run: checkpoints
are built here as save_checkpoint lays them out (a loop state listing every file with its size,
torch archives written by torch.save), then damaged the way disks and copies damage them.

- a state file overwritten with garbage of the right size, or with its pickle corrupted, does not
  verify (it used to pass the size check and fail in DeepSpeed's unpickler, with no fall-back);
- resuming (`find_latest`) falls back to the previous good checkpoint of the same run with one
  warning line naming the file;
- a finished run whose final checkpoint is damaged is said as such, with the intact checkpoint to
  continue from, and never with advice to --overwrite (which would delete the run).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from forgepipe.checkpoint import find_latest
from forgepipe.checkpoint_verify import torch_file_problem, verify_checkpoint
from forgepipe.config import Config
from forgepipe.errors import ForgeError
from forgepipe.preflight import check_output_dir, damaged_final_line, finished_line

RUN_ID = "0123456789abcdef"
STATE = "model/mp_rank_00_model_states.pt"


def make_checkpoint(root: Path, step: int, run_id: str = RUN_ID) -> Path:
    """checkpoints/step-<step>: a model state and an RNG state (torch archives), then the loop state."""
    path = root / f"step-{step:08d}"
    (path / "model").mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(2048, dtype=torch.float32) * step}, "step": step}, path / STATE)
    torch.save({"torch": torch.get_rng_state()}, path / "rng_rank00000.pt")
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    (path / "loop_state.json").write_text(json.dumps({"step": step, "run_id": run_id, "engines": ["model"],
                                                      "files": files}))
    return path


def garbage_of_the_same_size(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes((b"garbage!" * (size // 8 + 1))[:size])


def finished_run(out: Path, steps: tuple[int, ...] = (2, 4)) -> Path:
    """An output directory a run finished in at the last of `steps`, with a checkpoint at each."""
    root = out / "checkpoints"
    for step in steps:
        make_checkpoint(root, step)
    (root / "latest").write_text(json.dumps({"tag": f"step-{steps[-1]:08d}"}))
    (out / "model").mkdir()
    (out / "forgepipe-run.json").write_text(json.dumps({"stage": "sft", "model_dir": str(out / "model"),
                                                         "mlflow_run_id": RUN_ID, "steps": steps[-1],
                                                         "tracking_uri": "sqlite:///x.db"}))
    return root


def test_a_whole_checkpoint_verifies(tmp_path):
    assert verify_checkpoint(make_checkpoint(tmp_path, 2)) is None


def test_garbage_of_the_right_size_is_found(tmp_path):
    path = make_checkpoint(tmp_path, 2)
    garbage_of_the_same_size(path / STATE)
    assert verify_checkpoint(path) == f"{path / STATE} is corrupt: not a torch archive (File is not a zip file)"


def test_a_corrupt_pickle_is_found_by_its_crc(tmp_path):
    path = make_checkpoint(tmp_path, 2)
    data = bytearray((path / STATE).read_bytes())
    data[100:140] = b"x" * 40  # inside data.pkl: torch.load raises UnpicklingError
    (path / STATE).write_bytes(bytes(data))
    problem = verify_checkpoint(path)
    assert problem is not None and "Bad CRC-32" in problem and "data.pkl" in problem, problem
    with pytest.raises(Exception, match="invalid load key"):
        torch.load(path / STATE, weights_only=False)


def test_a_legacy_torch_file_still_verifies(tmp_path):
    file = tmp_path / "old.pt"
    torch.save({"a": torch.ones(3)}, file, _use_new_zipfile_serialization=False)
    assert torch_file_problem(file) is None


def test_resuming_falls_back_to_the_previous_good_checkpoint_with_one_warning(tmp_path, caplog):
    root = finished_run(tmp_path)
    garbage_of_the_same_size(root / "step-00000004" / STATE)
    with caplog.at_level(logging.WARNING, logger="forgepipe.checkpoint"):
        assert find_latest(tmp_path) == root / "step-00000002"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{root}/step-00000004/{STATE} is corrupt" in warning
    assert f"resuming from {root}/step-00000002 instead" in warning
    assert sorted(os.listdir(root)) == ["latest", "step-00000002", "step-00000004"]  # nothing removed


def sft_config(out: Path, **train) -> Config:
    cfg = Config(stage="sft", output_dir=str(out))
    cfg.model.name_or_path = "forge-s"
    cfg.data.sources = ["/data/pairs.jsonl"]
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_resume_of_a_garbage_checkpoint_is_refused_naming_the_file_and_the_good_one(tmp_path):
    root = finished_run(tmp_path / "run")
    garbage_of_the_same_size(root / "step-00000004" / STATE)
    with pytest.raises(ForgeError) as err:
        check_output_dir(sft_config(tmp_path / "other", resume=str(root / "step-00000004")))
    assert str(err.value) == (f"--resume: {root}/step-00000004 cannot be resumed from: {root}/step-00000004/{STATE} "
                              "is corrupt: not a torch archive (File is not a zip file); the newest intact "
                              f"checkpoint before it is {root}/step-00000002 (step 2)")


def test_a_truncated_final_loop_state_is_not_blamed_on_final_checkpoint_nor_answered_with_overwrite(tmp_path):
    """Issue 22 item 12: the final checkpoint's loop_state.json cut short, an older checkpoint intact."""
    root = finished_run(tmp_path)
    state = root / "step-00000004" / "loop_state.json"
    state.write_text(state.read_text()[:40])
    line = damaged_final_line(tmp_path, 4)
    assert line == (f"its final checkpoint is damaged ({state} is unreadable (JSONDecodeError)); --resume "
                    f"{root}/step-00000002 continues from its newest intact checkpoint (step 2). "
                    f"Its export is in {tmp_path}/model")
    with pytest.raises(ForgeError) as err:  # an extension: refused in one line
        check_output_dir(sft_config(tmp_path, max_steps=6))
    message = str(err.value)
    assert f"holds a run that finished at step 4, but {line}" in message
    assert "--overwrite" not in message and "final-checkpoint" not in message
    assert finished_line(sft_config(tmp_path, max_steps=6)) is None  # not "nothing to do": it adds steps


def test_a_damaged_final_checkpoint_without_an_intact_one_never_advises_overwrite(tmp_path):
    root = finished_run(tmp_path, steps=(4,))
    (root / "step-00000004" / "loop_state.json").write_text("{")
    with pytest.raises(ForgeError) as err:
        check_output_dir(sft_config(tmp_path, max_steps=6))
    assert "it has no intact checkpoint to continue from; train again into another --output-dir" in str(err.value)
    assert "--overwrite" not in str(err.value)


def test_the_same_command_on_a_run_with_a_damaged_final_checkpoint_says_so_and_does_nothing(tmp_path):
    root = finished_run(tmp_path)
    (root / "step-00000004" / "loop_state.json").write_text("{")
    cfg = sft_config(tmp_path, max_steps=4)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    line = finished_line(cfg)
    assert line is not None and line.startswith(f"{tmp_path} already finished at step 4: nothing to do; but its "
                                                "final checkpoint is damaged"), line
    assert "--overwrite" not in line and "final-checkpoint" not in line
