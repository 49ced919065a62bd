"""Controllers: each a small class with its rule as a formula in its docstring.

Schedule controllers return a `StepPlan`; verify controllers return `[B]` verify lengths.
Both satisfy the protocols in `adactl.interface` and run in `adactl.loop.ControlLoop`.

- baselines: `NoSpeculation`, `FixedDraftLength` (standard speculative decoding),
  `HeuristicSchedule` (transformers' +2/-1), `ConfidenceStop` (transformers' 0.4 stop),
  `BucketEMA` (SGLang's accepted-length average per batch-size bucket);
- `SpeculativeVerification`: batch-aware verify lengths from acceptance + step time;
- `GoodputLength`: the draft length that maximises predicted tokens per second;
- `RequestGoodput`: a draft length per request, the batch's draft tokens allocated by each
  request's own acceptance (`RequestAcceptance`) against the step's marginal cost;
- `SLODraftLength` + `AdaServe`: draft and verify lengths that keep each request on its TPOT
  SLO first, then throughput;
- token trees: `TreeDraft` (a fixed tree), `GoodputTree` (tree depth from the goodput
  length), `RequestGoodputTree` (a tree depth per request), `GlobalTreeAllocation` (the
  verify budget spent on the nodes of highest survival across the batch);
  `SLODraftLength(tree_width=...)` + `AdaServe` over trees;
- `oracle` (benchmarks only): verification with the target's verdict known in advance
  (chains and trees); `request_oracle` (the replay only): per-request draft lengths knowing
  each request's acceptance in hindsight, or (`lookahead=True`) each step's verdict.

Streaming (schedule decision: admit, run or defer, prefill budget):
- baselines: `FCFS` (vLLM: max_num_seqs, decode first, static chunked-prefill budget),
  `DeadlineFirst` (EDF / least slack), `AndesPriority` (largest delivery lag first);
- `ProgressServe`: run what is at risk, defer safe buffers, admit only what stays safe;
- `TTFTPrefillBudget`: the smallest prefill budget that keeps every TTFT feasible;
- `BufferOffload`: TokenFlow-like buffer priority plus offload (ProgressServe's memory lever alone);
- `VLLMv1`: vLLM v1's scheduler on the server's KV blocks (shared token budget, whole-sequence
  admission, head-of-line blocking, last-admitted recompute preemption), the memory baseline.

Learned: `LearnedController` serves a PPO policy trained by train/ppo.py in `adactl.envs`
(weights-only file; the same observation features as the environment).
"""

from .adaserve import AdaServe, SLODraftLength
from .andes import AndesPriority
from .bucket_ema import BucketEMA
from .deadline_first import DeadlineFirst
from .fcfs import FCFS
from .fixed import FixedDraftLength, NoSpeculation
from .goodput import GoodputLength
from .heuristic import HeuristicSchedule
from .learned import LearnedController, Policy, PolicyError
from .oracle import Hindsight, Lookahead, PerfectAcceptance, oracle, request_oracle
from .prefill_budget import TTFTPrefillBudget
from .progressserve import ProgressServe
from .request_goodput import RequestGoodput
from .sv import SpeculativeVerification
from .threshold import ConfidenceStop
from .tokenflow import BufferOffload
from .trees import GlobalTreeAllocation, GoodputTree, RequestGoodputTree, TreeDraft
from .vllm_v1 import VLLMv1

__all__ = [
    "FCFS",
    "AdaServe",
    "AndesPriority",
    "BucketEMA",
    "BufferOffload",
    "ConfidenceStop",
    "DeadlineFirst",
    "FixedDraftLength",
    "GlobalTreeAllocation",
    "GoodputLength",
    "GoodputTree",
    "HeuristicSchedule",
    "Hindsight",
    "LearnedController",
    "Lookahead",
    "NoSpeculation",
    "PerfectAcceptance",
    "Policy",
    "PolicyError",
    "ProgressServe",
    "RequestGoodput",
    "RequestGoodputTree",
    "SLODraftLength",
    "SpeculativeVerification",
    "TTFTPrefillBudget",
    "TreeDraft",
    "VLLMv1",
    "oracle",
    "request_oracle",
]
