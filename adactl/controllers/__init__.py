"""Controllers: each a small class with its rule as a formula in its docstring.

Schedule controllers return a `StepPlan`; verify controllers return `[B]` verify lengths.
Both satisfy the protocols in `adactl.interface` and run in `adactl.loop.ControlLoop`.

- baselines: `NoSpeculation`, `FixedDraftLength` (standard speculative decoding),
  `HeuristicSchedule` (transformers' +2/-1), `ConfidenceStop` (transformers' 0.4 stop),
  `BucketEMA` (SGLang's accepted-length average per batch-size bucket);
- `SpeculativeVerification`: batch-aware verify lengths from acceptance + step time;
- `GoodputLength`: the draft length that maximises predicted tokens per second;
- `SLODraftLength` + `AdaServe`: draft and verify lengths that keep each request on its TPOT
  SLO first, then throughput;
- `oracle` (benchmarks only): verification with the target's verdict known in advance.
"""

from .adaserve import AdaServe, SLODraftLength
from .bucket_ema import BucketEMA
from .fixed import FixedDraftLength, NoSpeculation
from .goodput import GoodputLength
from .heuristic import HeuristicSchedule
from .oracle import PerfectAcceptance, oracle
from .sv import SpeculativeVerification
from .threshold import ConfidenceStop

__all__ = [
    "AdaServe",
    "BucketEMA",
    "ConfidenceStop",
    "FixedDraftLength",
    "GoodputLength",
    "HeuristicSchedule",
    "NoSpeculation",
    "PerfectAcceptance",
    "SLODraftLength",
    "SpeculativeVerification",
    "oracle",
]
