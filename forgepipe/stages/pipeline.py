"""sft -> reward -> ppo in one command, each stage's export feeding the next.

SFT's export becomes the PPO actor and reference; the reward export becomes the reward model
and the critic's start. In MLflow the three stages are child runs of one parent run. A rerun
(`--resume auto`, the default) skips the stages that finished and resumes the one it was in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from forgepipe import distributed as dist
from forgepipe.config import STAGES, Config, build_config, load_yaml
from forgepipe.errors import ForgeError
from forgepipe.layout import StageResult
from forgepipe.preflight import finished_stage
from forgepipe.signals import Preempted
from forgepipe.tracking import Tracker, write_json_atomic

log = logging.getLogger(__name__)

PIPELINE_FILE = "forgepipe-pipeline.json"


def pipeline_configs(model: str | None, reward_model: str | None, output_dir: str | None,
                     config_file: str | None, overrides: dict[str, Any]) -> dict[str, Config]:
    """One validated config per stage: shared YAML keys, then the stage's `stages.<name>` section,
    then the command line (which applies to every stage)."""
    tree = load_yaml(config_file) if config_file else {}
    sections = tree.pop("stages", {}) or {}
    unknown = set(sections) - set(STAGES)
    if unknown:
        raise ForgeError(f"{config_file}: stages: unknown stage {sorted(unknown)[0]!r} (known: {', '.join(STAGES)})")
    model = model or tree.get("model", {}).get("name_or_path")
    output_dir = output_dir or tree.get("output_dir")
    if not model:
        raise ForgeError("required", key="model.name_or_path")
    if not output_dir:
        raise ForgeError("required", key="output_dir")
    out = Path(output_dir)
    stage_models = {
        "sft": {"model.name_or_path": model},
        "reward": {"model.name_or_path": reward_model or model},
        "ppo": {"model.name_or_path": str(out / "sft"), "ppo.reward_model": str(out / "reward")},
    }
    configs = {}
    for stage in STAGES:
        layers = [(tree, f"{config_file}: ")] if tree else []
        if sections.get(stage):
            layers.append((sections[stage], f"{config_file}: stages.{stage}."))
        stage_overrides = {**overrides, **stage_models[stage], "output_dir": str(out / stage)}
        configs[stage] = build_config(stage, None, stage_overrides, layers=layers)
    return configs


def preflight(configs: dict[str, Config]) -> None:
    """Check every stage's models and data before the first one trains for hours."""
    from forgepipe.data import load_stage_data
    from forgepipe.models.catalog import resolve_model

    resolve_model(configs["sft"].model.name_or_path, configs["sft"].model.catalog)
    resolve_model(configs["reward"].model.name_or_path, configs["reward"].model.catalog)
    for stage, cfg in configs.items():
        if not cfg.data.sources:
            raise ForgeError("at least one data source is required", key="data.sources")
        load_stage_data(cfg.data.sources, stage, cfg.data.split, cfg.train.seed, cfg.data.eval_fraction,
                        max_dropped_fraction=cfg.data.max_dropped_fraction)


def run_pipeline(configs: dict[str, Config]) -> StageResult:
    from forgepipe.stages.ppo.trainer import run_ppo
    from forgepipe.stages.reward import run_reward
    from forgepipe.stages.sft import run_sft

    runners = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo}
    root = Path(configs["sft"].output_dir).parent
    world = dist.init_distributed(dist.detect_world(),
                                  timeout_minutes=configs["sft"].train.dist_timeout_minutes)
    tracker = Tracker(enabled=False)
    status = "FAILED"
    try:
        preflight(configs)
        state_file = root / PIPELINE_FILE
        previous = json.loads(state_file.read_text()) if state_file.is_file() else {}
        resume = configs["sft"].train.resume != "never" and not configs["sft"].overwrite
        first = configs["sft"]
        tracker = Tracker.start(world=world, uri=first.tracking.uri, experiment=first.tracking.experiment,
                                run_name=first.tracking.run_name or f"pipeline-{root.name}",
                                run_id=previous.get("parent_run_id") if resume else None,
                                tags={"stage": "pipeline"})
        if world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_file, {"parent_run_id": tracker.run_id})
            for stage, cfg in configs.items():
                tracker.log_text(cfg.to_yaml(), f"config-{stage}.yaml")
        parent_id = dist.broadcast_object(tracker.run_id)
        for stage in STAGES:
            result = finished_stage(configs[stage])
            if result:
                log.info("stage %s already finished: %s", stage, result.model_dir)
                continue
            result = runners[stage](configs[stage], parent_run_id=parent_id)
            tracker.set_tags({f"{stage}_model_dir": result.model_dir})
        status = "FINISHED"
        return result
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, Preempted) else "FAILED"
        raise
    finally:
        tracker.finish(status)
        dist.teardown()
