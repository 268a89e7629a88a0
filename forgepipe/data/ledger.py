"""What data a stage trains on, in rows: the one line every stage logs before it trains, e.g.

    sft: trains on 1,144 of 1,512 rows (308 dropped: 301 too long for --max-seq-len 512, 7 ...); 60 held out
    reward: share 4 of 2,4,4 = 602 of 1,512 rows (7 dropped before the split: ...); trains on 540 (2 dropped:
        ...); 60 held out

Every row of the stage's share is accounted for: trained on + held out + dropped = the share (the
sources' rows less what no format fits, when the stage has them all). load_stage_data records the
sources, the share and the held-out rows (`record_stage`), the tokenize functions the rows they drop
under the fingerprint of the rows they were given (`record_dropped`); StageContext.begin, once the
data is tokenized, joins the two (`stage_line`). Plain Python: nothing here imports datasets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from forgepipe.config import STAGES, data_share, parse_split


@dataclass
class StageRows:
    """One stage's rows, as load_stage_data cut them (before tokenization)."""

    stage: str  # the stage whose share of data.split this is (sft, reward, ppo)
    split: str  # data.split as resolved
    rows: int = 0  # records in the sources
    unfit: Counter = field(default_factory=Counter)  # reason -> rows no format fits (whole sources)
    share: int = 0  # usable rows in the stage's share
    unused: Counter = field(default_factory=Counter)  # reason -> rows of the share neither trained nor held out
    train: int = 0  # rows handed to training (before tokenization)
    held_out: int = 0  # rows handed to evaluation (before tokenization)
    fingerprints: tuple[str | None, str | None] = (None, None)  # of the (train, eval) datasets

    @property
    def whole(self) -> bool:
        """The stage takes every usable row of its sources (data.split gives the others nothing)."""
        return parse_split(self.split)[STAGES.index(self.stage)] == 1.0


# The stages this process cut data for, by share (a pipeline's preflight cuts every stage's); and
# the rows each tokenization dropped, by the fingerprint of the dataset it was given.
STAGE_ROWS: dict[str, StageRows] = {}
TOKENIZE_DROPS: dict[str, Counter] = {}


def record_stage(rows: StageRows) -> None:
    STAGE_ROWS[rows.stage] = rows


def record_dropped(ds, reasons: dict[str, int]) -> None:
    """Rows of `ds` (a datasets.Dataset) that tokenization dropped, per reason (zeros ignored)."""
    fingerprint = getattr(ds, "_fingerprint", None)
    if fingerprint is not None:
        TOKENIZE_DROPS[fingerprint] = Counter({r: n for r, n in reasons.items() if n})


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in counts.most_common())


def _dropped(counts: Counter, before: str = "") -> str:
    total = sum(counts.values())
    return f" ({total:,} dropped{before}: {_reasons(counts)})" if total else ""


def stage_line(stage: str, rows: StageRows | None = None) -> str | None:
    """The line for `stage` (dpo reads the reward share), from its StageRows (default: the one
    recorded last) and the tokenization drops recorded since; None when no data was cut for it."""
    rows = rows or STAGE_ROWS.get(data_share(stage))
    if rows is None:
        return None
    train_fp, eval_fp = rows.fingerprints
    train_drops = TOKENIZE_DROPS.get(train_fp, Counter()) if train_fp else Counter()
    eval_drops = TOKENIZE_DROPS.get(eval_fp, Counter()) if eval_fp else Counter()
    after = rows.unused + train_drops + eval_drops
    train = rows.train - sum(train_drops.values())
    held_out = rows.held_out - sum(eval_drops.values())
    if rows.whole:
        line = f"{stage}: trains on {train:,} of {rows.rows:,} rows{_dropped(rows.unfit + after)}"
    else:
        index = STAGES.index(rows.stage)
        part = rows.split.split(",")[index].strip()
        line = (f"{stage}: share {part} of {rows.split} = {rows.share:,} of {rows.rows:,} rows"
                f"{_dropped(rows.unfit, ' before the split')}; trains on {train:,}{_dropped(after)}")
    return f"{line}; {held_out:,} held out"
