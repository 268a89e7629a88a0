"""sft -> reward -> ppo (--method ppo) or sft -> dpo (--method dpo) in one command, each stage's
export feeding the next.

PPO: SFT's export becomes the PPO actor and reference; the reward export becomes the reward model
and the critic's start. DPO: SFT's export becomes the policy and the reference, and DPO trains on
the reward share of --data-split (the preference pairs; config.data_share), so `--data-split 2,8,0`
gives it the PPO share as well. The stages split one source (config.PIPELINE_SPLIT by default),
where a stage run alone trains on all of its data. In MLflow the stages are child runs of one
parent run. A rerun (`--resume auto`, the default) skips the stages that finished and resumes the
one it was in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from forgepipe import distributed as dist
from forgepipe.config import PIPELINE_SPLIT, Config, build_config, data_share, load_yaml
from forgepipe.errors import ForgeError
from forgepipe.layout import StageResult
from forgepipe.preflight import finished_stage
from forgepipe.signals import Preempted
from forgepipe.tracking import Tracker, pipeline_params, pipeline_tags, run_name_for, write_json_atomic

log = logging.getLogger(__name__)

PIPELINE_FILE = "forgepipe-pipeline.json"
METHODS: dict[str, tuple[str, ...]] = {"ppo": ("sft", "reward", "ppo"), "dpo": ("sft", "dpo")}  # stages, in order


def stage_models(method: str, model: str, reward_model: str | None, out: Path) -> dict[str, dict[str, str]]:
    """Each stage's model options: the given models for the first stages, the exports after."""
    if method == "dpo":
        if reward_model:
            raise ForgeError("--reward-model: not used by --method dpo (DPO needs no reward model)")
        return {"sft": {"model.name_or_path": model}, "dpo": {"model.name_or_path": str(out / "sft")}}
    return {"sft": {"model.name_or_path": model}, "reward": {"model.name_or_path": reward_model or model},
            "ppo": {"model.name_or_path": str(out / "sft"), "ppo.reward_model": str(out / "reward")}}


def check_method_options(method: str, overrides: dict[str, Any]) -> None:
    """An option of the other method's last stage (--beta under --method ppo, --kl-coef under
    --method dpo) would be silently ignored: refused instead."""
    foreign = "dpo." if method == "ppo" else "ppo."
    given = [key for key, value in overrides.items() if key.startswith(foreign) and value is not None]
    if given:
        other = "dpo" if method == "ppo" else "ppo"
        raise ForgeError(f"only for --method {other} (this pipeline runs --method {method})", key=given[0])


def pipeline_configs(model: str | None, reward_model: str | None, output_dir: str | None,
                     config_file: str | None, overrides: dict[str, Any], method: str = "ppo") -> dict[str, Config]:
    """One validated config per stage of `method`, in order: shared YAML keys, then the stage's
    `stages.<name>` section, then the command line (which applies to every stage)."""
    stages = METHODS[method]
    check_method_options(method, overrides)
    tree = load_yaml(config_file) if config_file else {}
    sections = tree.pop("stages", {}) or {}
    unknown = set(sections) - set(stages)
    if unknown:
        raise ForgeError(f"{config_file}: stages: unknown stage {sorted(unknown)[0]!r} "
                         f"(known for --method {method}: {', '.join(stages)})")
    model = model or tree.get("model", {}).get("name_or_path")
    output_dir = output_dir or tree.get("output_dir")
    if not model:
        raise ForgeError("required", key="model.name_or_path")
    if not output_dir:
        raise ForgeError("required", key="output_dir")
    out = Path(output_dir)
    models = stage_models(method, model, reward_model, out)
    configs = {}
    for stage in stages:
        # The stages share one source: --data-split cuts it (PIPELINE_SPLIT unless the YAML or the
        # command line says otherwise), where a stage run alone would read all of it.
        layers = [({"data": {"split": PIPELINE_SPLIT}}, "")] + ([(tree, f"{config_file}: ")] if tree else [])
        if sections.get(stage):
            layers.append((sections[stage], f"{config_file}: stages.{stage}."))
        stage_overrides = {**overrides, **models[stage], "output_dir": str(out / stage)}
        configs[stage] = build_config(stage, None, stage_overrides, layers=layers)
    return configs


def preflight(configs: dict[str, Config]) -> None:
    """Check every stage's models and data before the first one trains for hours."""
    from forgepipe.data import load_stage_data
    from forgepipe.models.catalog import resolve_model

    resolve_model(configs["sft"].model.name_or_path, configs["sft"].model.catalog)
    if "reward" in configs:
        resolve_model(configs["reward"].model.name_or_path, configs["reward"].model.catalog)
    if "dpo" in configs and configs["dpo"].dpo.ref_model:
        resolve_model(configs["dpo"].dpo.ref_model, configs["dpo"].model.catalog)
    for stage, cfg in configs.items():
        if not cfg.data.sources:
            raise ForgeError("at least one data source is required", key="data.sources")
        load_stage_data(cfg.data.sources, data_share(stage), cfg.data.split, cfg.train.seed, cfg.data.eval_fraction,
                        max_dropped_fraction=cfg.data.max_dropped_fraction)


def parent_run_id(configs: dict[str, Config]) -> str:
    """The pipeline's MLflow parent run, as its state file records it."""
    root = Path(configs["sft"].output_dir).parent
    return json.loads((root / PIPELINE_FILE).read_text())["parent_run_id"]


def run_pipeline(configs: dict[str, Config]) -> StageResult:
    """The stages of `configs` in order (pipeline_configs), under one MLflow parent run."""
    from forgepipe.stages.dpo.trainer import run_dpo
    from forgepipe.stages.ppo.trainer import run_ppo
    from forgepipe.stages.reward import run_reward
    from forgepipe.stages.sft import run_sft

    runners = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo, "dpo": run_dpo}
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
                                run_name=run_name_for(first, world, stage="pipeline"),
                                run_id=previous.get("parent_run_id") if resume else None,
                                tags={**pipeline_tags(configs), "method": "dpo" if "dpo" in configs else "ppo"})
        tracker.log_params(pipeline_params(configs))
        if world.is_main:
            root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_file, {"parent_run_id": tracker.run_id})
            for stage, cfg in configs.items():
                tracker.log_text(cfg.to_yaml(), f"config-{stage}.yaml")
        parent_id = dist.broadcast_object(tracker.run_id)
        for stage in configs:
            result = finished_stage(configs[stage])
            if result:
                log.info("stage %s already finished: %s", stage, result.model_dir)
                tracker.record_child(stage, result.run_id)
                continue
            result = runners[stage](configs[stage], parent_run_id=parent_id)
            tracker.set_tags({f"{stage}_model_dir": result.model_dir})
            tracker.record_child(stage, result.run_id)
        status = "FINISHED"
        return result
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, Preempted) else "FAILED"
        raise
    finally:
        tracker.finish(status)
        dist.teardown()
