"""Controllers: each a small class with its rule as a formula in its docstring.

Schedule controllers return a `StepPlan`; verify controllers return `[B]` verify lengths.
Both satisfy the protocols in `adactl.interface` and run in `adactl.loop.ControlLoop`.
"""

from .fixed import FixedDraftLength, NoSpeculation
from .threshold import ConfidenceStop

__all__ = ["ConfidenceStop", "FixedDraftLength", "NoSpeculation"]
