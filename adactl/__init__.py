"""adactl: online control of LLM serving.

Attach a utility estimate to each controllable unit of work (a draft-token prefix, an
in-flight request) and let a controller spend compute where the estimate says it pays,
without giving up losslessness or service goals. Subpackages: `adactl.runtime` (the
engine), `adactl.estimators`, `adactl.envs`, `adactl.bench`.
"""

__version__ = "0.1.0"
