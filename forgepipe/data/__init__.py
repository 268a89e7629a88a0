"""Data for the three stages: sources -> normalised rows -> per-stage share -> train/eval.

Tokenization (tokenize.py) and batching (collate.py) come after; this module only decides
which rows a stage sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from forgepipe.config import STAGES, parse_split, whole_split
from forgepipe.data.formats import DEFAULT_MAX_DROPPED_FRACTION, DropReport, check_dropped
from forgepipe.data.ledger import StageRows, record_stage
from forgepipe.data.split import stage_share, train_eval
from forgepipe.errors import ForgeError

if TYPE_CHECKING:  # imported where used, so that the pre-launch checks (preflight.py) stay fast
    import datasets

__all__ = ["load_stage_data", "load_text_data", "check_dropped", "DROP_REPORTS"]

# Every source this process normalised, with its dropped rows; RunRecord.open logs them to MLflow.
DROP_REPORTS: dict[str, DropReport] = {}


def _load_normalised(source: str, keep: Sequence[str] = (), need_pairs: bool = False,
                     max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION) -> datasets.Dataset:
    from forgepipe.data.formats import normalise, require_pairs
    from forgepipe.data.sources import load_source
    from forgepipe.distributed import main_process_first

    # Rank 0 first: datasets writes its Arrow cache once, the other ranks then read it.
    with main_process_first():
        raw = load_source(source)
        if need_pairs:
            require_pairs(raw, source)
        report = DropReport(source)
        ds, _ = normalise(raw, source, keep, report=report)
    DROP_REPORTS[source] = report
    check_dropped(report, max_dropped_fraction)
    return ds


def load_stage_data(
    sources: Sequence[str],
    stage: str,
    split: str | None,
    seed: int,
    eval_fraction: float,
    keep_fields: Sequence[str] = (),
    *,
    max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION,
    eval_max_samples: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval) rows of `stage` from every source, concatenated in source order.

    sft keeps every kind (pairs train on prompt + chosen); reward requires pairs; ppo keeps rows
    with a non-empty prompt. `keep_fields` carries extra columns through (e.g. a margin field).
    A source losing more than `max_dropped_fraction` of its rows is an error; the held-out rows
    are capped at `eval_max_samples` (0: no cap), the same rows on every rank and every rerun.
    `split` None: the stage takes every row (config.whole_split). What was kept and dropped is
    recorded for the stage's data line (ledger.py).
    """
    import datasets

    if not sources:
        raise ForgeError("no data sources given", key="data.sources")
    if stage not in STAGES:
        raise ForgeError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    split = whole_split(stage) if split is None else split
    shares = parse_split(split)
    rows = StageRows(stage, split)
    trains, evals = [], []
    for source in sources:
        ds = _load_normalised(source, keep_fields, need_pairs=stage == "reward",
                              max_dropped_fraction=max_dropped_fraction)
        report = DROP_REPORTS[source]
        rows.rows += report.total
        rows.unfit.update({reason: count for reason, (count, _) in report.reasons.items()})
        indices = stage_share(len(ds), shares, STAGES.index(stage), seed)
        rows.share += len(indices)
        if not indices:
            raise ForgeError(
                f"{source}: --data-split {split} leaves stage {stage} no rows (the source has {len(ds)} usable rows)"
            )
        if stage == "ppo":
            prompts = ds["prompt"][:]
            kept = [i for i in indices if prompts[i]]
            rows.unused["no prompt ({text} rows)"] += len(indices) - len(kept)
            indices = kept
        train_idx, eval_idx = train_eval(indices, eval_fraction, seed)
        trains.append(ds.select(train_idx))
        evals.append(ds.select(eval_idx))
    train, evaluation = datasets.concatenate_datasets(trains), datasets.concatenate_datasets(evals)
    if eval_max_samples and len(evaluation) > eval_max_samples:
        past = f"held-out rows past --eval-max-samples {eval_max_samples}"
        rows.unused[past] += len(evaluation) - eval_max_samples
        evaluation = evaluation.select(range(eval_max_samples))
    rows.train, rows.held_out = len(train), len(evaluation)
    rows.fingerprints = (train._fingerprint, evaluation._fingerprint)
    record_stage(rows)
    if len(train) == 0:
        raise ForgeError(f"{', '.join(sources)}: no rows with a prompt for stage {stage} ({{text}} sources have none)")
    return train, evaluation


def load_text_data(sources: Sequence[str], seed: int) -> datasets.Dataset:
    """Every row of the unsupervised sources (PPO-ptx), normalised and shuffled with `seed`; no split."""
    import datasets

    if not sources:
        raise ForgeError("no sources given", key="data.unsupervised_sources")
    ds = datasets.concatenate_datasets([_load_normalised(s) for s in sources])
    return ds.shuffle(seed=seed)
