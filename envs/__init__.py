"""adactl.envs: Gymnasium environments whose steps are engine steps.

    import gymnasium as gym
    import adactl.envs  # registers the ids below

    env = gym.make("adactl/SpecDecode-v0", backend="replay")   # or backend="real"
    env = gym.make("adactl/Streaming-v0", backend="replay")
    env = gym.make("adactl/SpecDecode-v0", profile="h100-llama-3.1-8b", traces="mixed", per_row=True)

- `adactl/SpecDecode-v0` (`SpecDecodeEnv`): the draft length of each engine step (or, with
  `per_row=True`, a cap and a threshold on each request's own acceptance estimate); reward =
  tokens emitted per second of the step (or its speedup over plain decoding). With
  `profile=` a computed GPU profile and `traces=` the recorded per-request acceptance, the
  GPU regime, on any machine.
- `adactl/Streaming-v0` (`StreamingEnv`): the streaming scheduler's admission threshold and
  deferral margin each step; reward = units read on time minus a penalty per miss.

Backends (`envs/backends.py`): "replay" (profile replay: deterministic, thousands of steps a
second; for long training) and "real" (the engine on the default models; measured step
times; for fine-tuning and evaluation).
"""

from gymnasium.envs.registration import register, registry

from .spec_decode import SpecDecodeEnv
from .streaming import StreamingEnv

for _id, _entry in (("adactl/SpecDecode-v0", "adactl.envs.spec_decode:SpecDecodeEnv"),
                    ("adactl/Streaming-v0", "adactl.envs.streaming:StreamingEnv")):  # fmt: skip
    if _id not in registry:
        register(id=_id, entry_point=_entry, nondeterministic=False)

__all__ = ["SpecDecodeEnv", "StreamingEnv"]
