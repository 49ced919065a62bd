"""Gymnasium environments, PPO training with TensorBoard output, and the learned controller."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils import env_checker
from gymnasium.utils.passive_env_checker import env_reset_passive_checker, env_step_passive_checker

import adactl.envs  # noqa: F401  (registers the ids)
from adactl.controllers.learned import LearnedController, Policy, PolicyError
from adactl.envs.streaming import StreamingEnv
from adactl.interface import ScheduleState
from adactl.loop import ControlLoop
from adactl.runtime import SamplingParams, StepPlan
from adactl.runtime.replay import ReplayEngine

from .test_estimators import _script

TINY_SPEC = {"model": "tiny", "episode_steps": 8, "batch_sizes": (1, 4)}
TINY_STREAM = {"model": "tiny", "episode_requests": 6, "loads": (2.0, 4.0)}


def _no_warnings(fn, *args) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    mine = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert mine == []


@pytest.mark.parametrize("env_id, kwargs", [("adactl/SpecDecode-v0", TINY_SPEC), ("adactl/Streaming-v0", TINY_STREAM)])
def test_replay_envs_pass_check_env_without_warnings(env_id, kwargs):
    env = gym.make(env_id, backend="replay", **kwargs)
    _no_warnings(env_checker.check_env, env.unwrapped)
    # and they are deterministic for a seed, episode to episode
    rewards = []
    for _ in range(2):
        env.reset(seed=3)
        rewards.append([env.step(env.action_space.sample() * 0 + 1)[1] for _ in range(5)])
    assert rewards[0] == rewards[1]


@pytest.mark.parametrize("env_id, kwargs", [("adactl/SpecDecode-v0", TINY_SPEC), ("adactl/Streaming-v0", TINY_STREAM)])
def test_real_envs_pass_the_api_checks(env_id, kwargs):
    """The real backend measures step times, so rewards are not reproducible; everything else
    `check_env` checks holds."""
    env = gym.make(env_id, backend="real", **kwargs).unwrapped
    assert not env.backend.deterministic
    env_checker.check_action_space(env.action_space)
    env_checker.check_observation_space(env.observation_space)
    env_checker.check_reset_return_type(env)
    env_checker.check_reset_options(env)
    if env_id == "adactl/SpecDecode-v0":  # (streaming observations read the wall clock)
        env_checker.check_reset_seed_determinism(env)
    _no_warnings(env_reset_passive_checker, env)
    _no_warnings(env_step_passive_checker, env, env.action_space.sample())
    if hasattr(env_checker, "check_returned_data_not_reused"):  # gymnasium >= 1.3 (RLlib pins 1.2)
        env_checker.check_returned_data_not_reused(env)


def test_spec_env_reward_is_tokens_per_second_and_actions_matter():
    env = gym.make("adactl/SpecDecode-v0", backend="real", **TINY_SPEC).unwrapped
    env.reset(seed=0, options={"batch_size": 4})
    _, reward, _, _, info = env.step(2)
    assert info["draft_len"] == 2 and reward == pytest.approx(info["tokens_per_s"] / 100)
    assert 0 <= info["accepted_len"] <= 2
    with pytest.raises(ValueError, match=r"action must be in 0\.\.4"):
        env.step(99)
    assert env.baseline_action("fixed-k3") == 3 and env.baseline_action("no-spec") == 0
    assert 0 <= env.baseline_action("goodput") <= 4
    with pytest.raises(ValueError, match="unknown baseline"):
        env.baseline_action("k3")


def test_streaming_env_counts_every_unit_once():
    env = gym.make("adactl/Streaming-v0", backend="replay", **TINY_STREAM).unwrapped
    env.reset(seed=1, options={"load": 4.0})
    done, on_time, misses = False, 0, 0
    while not done:
        _, _, term, trunc, info = env.step(np.array([1, 2, 4]))
        on_time, misses, done = on_time + info["on_time"], misses + info["misses"], term or trunc
    results = env.loop.results
    assert len(results) == 6 and info["miss_rate"] == pytest.approx(misses / env.totals["units"])
    assert on_time + misses == sum(r.stream_units for r in results.values())
    assert misses == sum(r.stream_misses for r in results.values())
    with pytest.raises(ValueError, match="baseline"):
        env.reset(options={"baseline": "nope"})


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 256-step PPO run on two spawned replay workers (tiny models), with TensorBoard output."""
    ppo = _script("ppo")
    tmp = tmp_path_factory.mktemp("ppo")
    args = ppo.parse_args([
        "--model", "tiny", "--total-timesteps", "256", "--n-steps", "64", "--batch-size", "64", "--n-envs", "2",
        "--n-epochs", "2", "--episode-steps", "8", "--eval-every", "1", "--eval-episodes", "1",
        "--heldout-episodes", "0", "--out", str(tmp / "spec.safetensors"), "--runs-dir", str(tmp / "runs"),
        "--no-progress",
    ])  # fmt: skip
    path, act = ppo.train(args)
    return ppo, args, path, act, tmp


def test_ppo_smoke_run_writes_our_scalars_to_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, path, _, tmp = trained
    (run,) = list((tmp / "runs").iterdir())
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    ours = ["tokens_per_s", "accepted_len", "estimator_error", "policy_reward", "baseline_reward", "reward_ratio"]
    for tag in [f"adactl/{t}" for t in ours] + ["rollout/ep_rew_mean", "train/value_loss"]:
        assert tag in scalars, tag
    assert "adactl/action_hist_0" in events.Tags()["histograms"]
    assert all(np.isfinite(e.value) for e in events.Scalars("adactl/tokens_per_s"))
    assert json.loads((run / "train.json").read_text())["minutes"] > 0
    assert path.is_file()


def test_ppo_writes_only_under_its_run_directory_and_scales_its_evaluation(tmp_path, capsys):
    """Without --out a run leaves models/ untouched: the policy and its evaluation land in the
    run directory; the real-engine evaluation scales with the training (none for a short run,
    said so) unless asked for."""
    from adactl.runtime.models import SHIPPED_MODELS

    ppo = _script("ppo")
    shipped = {p: p.stat().st_mtime_ns for p in (SHIPPED_MODELS / "policies").iterdir()}
    report = ppo.main([
        "--model", "tiny", "--total-timesteps", "64", "--n-steps", "32", "--batch-size", "32", "--n-envs", "1",
        "--n-epochs", "1", "--episode-steps", "4", "--eval-every", "100", "--eval-episodes", "1",
        "--runs-dir", str(tmp_path / "runs"), "--no-progress",
    ])  # fmt: skip
    assert list(report) == ["training (replay)"]
    (run,) = list((tmp_path / "runs").iterdir())
    written = {p.name for p in run.iterdir()}
    assert {"policy.safetensors", "policy.eval.json", "policy.eval.png", "train.json"} <= written
    assert {p: p.stat().st_mtime_ns for p in (SHIPPED_MODELS / "policies").iterdir()} == shipped
    assert f"evaluation -> {run / 'policy.eval.json'}" in capsys.readouterr().out
    episodes = {n: ppo.heldout_episodes(ppo.parse_args(["--total-timesteps", str(n)])) for n in (2048, 150_000, 10**6)}
    assert episodes == {2048: 0, 150_000: 1, 10**6: 2}
    assert ppo.heldout_episodes(ppo.parse_args(["--total-timesteps", "2048", "--heldout-episodes", "3"])) == 3
    with pytest.raises(SystemExit):
        ppo.parse_args(["--heldout-episodes", "-2"])


def test_saved_policy_acts_exactly_like_the_trained_model(trained):
    _, _, path, act, _ = trained
    policy = Policy.load(path)
    env = gym.make("adactl/SpecDecode-v0", backend="replay", **TINY_SPEC)
    obs, _ = env.reset(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert policy.act(obs) == int(act(obs))
        obs = np.clip(obs + rng.normal(0, 0.2, obs.shape), 0, 1).astype(np.float32)


def test_learned_controller_serves_and_rejects_bad_files(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    ppo, args, path, _, _ = trained
    ctl = LearnedController(path, step_time=_tiny_step_time())
    engine = ReplayEngine(_tiny_step_time(), alpha=[0.6] * 4, seed=0)
    for i in range(3):
        engine.add_request(10 + i, SamplingParams(12, stop_on_eos=False))
    results = ControlLoop(engine, schedule=[ctl], max_draft_len=4, clock=engine.clock).run()
    assert len(results) == 3 and all(len(r.output_ids) == 12 for r in results.values())
    assert ctl.nonfinite == 0 and ctl.last_action is not None
    # a non-finite output: the safe action (no speculation), counted
    ctl.policy.action = (ctl.policy.action[0] * float("nan"), ctl.policy.action[1])
    state = ScheduleState(0.0, tuple(), 4, StepPlan(draft_len=3))
    assert ctl.act(state).draft_len == 0 and ctl.nonfinite == 1
    # missing, corrupt, wrong shape: a clear error at load time
    with pytest.raises(PolicyError, match="no policy file"):
        LearnedController(tmp_path / "missing.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PolicyError, match="not a readable"):
        LearnedController(tmp_path / "corrupt.safetensors")
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors["action.weight"] = torch.zeros(3, tensors["action.weight"].shape[1])
    tensors["action.bias"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(PolicyError, match="logits"):
        LearnedController(tmp_path / "shape.safetensors")


def _tiny_step_time():
    from adactl.estimators.step_time import tiny_step_time

    return tiny_step_time()


def test_streaming_baselines_and_policy_share_episodes():
    env = StreamingEnv(backend="replay", **TINY_STREAM)
    totals = {}
    for name in ("fcfs", "progressserve,ttft-budget"):
        env.reset(seed=7, options={"baseline": name, "load": 4.0})
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(np.array([1, 2, 4]))
            total, done = total + r, term or trunc
        totals[name] = (total, env.totals["units"])
    assert totals["fcfs"][1] == totals["progressserve,ttft-budget"][1]  # the same requests and consumers
    with pytest.raises(ValueError, match="does not speculate"):
        env.reset(seed=7, options={"baseline": "fcfs,fixed-k2"})
    with pytest.raises(ValueError, match="unknown controller"):
        env.reset(seed=7, options={"baseline": "fcfs,warp"})


def test_streaming_policy_trains_and_serves_as_a_schedule_controller(tmp_path):
    from adactl.runtime import Stream

    ppo = _script("ppo")
    args = ppo.parse_args([
        "--env-id", "adactl/Streaming-v0", "--model", "tiny", "--total-timesteps", "128", "--n-steps", "64",
        "--batch-size", "64", "--n-envs", "1", "--n-epochs", "1", "--eval-every", "100", "--eval-episodes", "1",
        "--heldout-episodes", "0", "--out", str(tmp_path / "stream.safetensors"), "--runs-dir", str(tmp_path / "runs"),
        "--no-progress",
    ])  # fmt: skip
    path, _ = ppo.train(args)
    ctl = LearnedController(path, step_time=_tiny_step_time())
    engine = ReplayEngine(_tiny_step_time(), seed=0)
    for i in range(4):
        engine.add_request(10 + i, SamplingParams(12, stop_on_eos=False), arrival_time=0.0, stream=Stream(5.0))
    loop = ControlLoop(engine, schedule=[ctl], clock=engine.clock)
    results = loop.run()
    assert len(results) == 4 and not loop.fallbacks
    assert all(r.stream_units == 12 for r in results.values())
    assert ctl.last_action is not None and ctl.last_action.shape == (3,)


@pytest.mark.parametrize("name", ["SpecDecode-v0", "Streaming-v0", "SpecDecode-v0-h100"])
def test_shipped_policies_load_and_act_on_their_env(name):
    from adactl.runtime.models import SHIPPED_MODELS

    ctl = LearnedController(SHIPPED_MODELS / "policies" / f"{name}.safetensors")
    assert ctl.policy.env_id == f"adactl/{name.removesuffix('-h100')}"
    kwargs = {k: v for k, v in ctl.policy.env_kwargs.items() if k not in ("device", "dtype")}
    env = gym.make(ctl.policy.env_id, **{**kwargs, "backend": "replay"})
    obs, _ = env.reset(seed=0)
    action = ctl.policy.act(obs)
    assert env.action_space.contains(np.asarray(action, dtype=np.int64).reshape(env.action_space.shape))


def test_replay_trains_against_another_machines_profile(tmp_path):
    """`profile=`: the replay's step costs are a profile file's (an H100's here), not this CPU's;
    a bad file is a clear error at `gym.make`, before anything runs."""
    from adactl.estimators.step_cost import ProfileError, StepCostModel
    from adactl.runtime.models import SHIPPED_MODELS

    h100 = SHIPPED_MODELS / "estimators" / "step_cost_h100.json"
    env = gym.make("adactl/SpecDecode-v0", backend="replay", profile=str(h100), **TINY_SPEC)
    assert isinstance(env.unwrapped.backend.step_time, StepCostModel)
    _no_warnings(env_checker.check_env, env.unwrapped)
    env.reset(seed=0)
    assert env.step(1)[1] > 0  # tokens per replayed second of a GPU-sized step
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ProfileError, match="adactl profile"):
        gym.make("adactl/SpecDecode-v0", backend="replay", profile=str(tmp_path / "bad.json"), **TINY_SPEC)


def test_real_backend_refuses_a_bad_device_before_loading():
    from adactl.runtime.device import DeviceError

    with pytest.raises(DeviceError):
        gym.make("adactl/SpecDecode-v0", backend="real", device="tpu", **TINY_SPEC)


RLLIB_RUN = """
import sys
import numpy as np
import gymnasium as gym
import adactl.envs
from adactl.controllers.learned import Policy
from tests.test_estimators import _script

ppo = _script("ppo")
tmp = sys.argv[1]
args = ppo.parse_args([
    "--trainer", "rllib", "--model", "tiny", "--total-timesteps", "256", "--n-steps", "64", "--batch-size", "64",
    "--n-envs", "2", "--n-epochs", "2", "--episode-steps", "8", "--eval-every", "1", "--eval-episodes", "1",
    "--heldout-episodes", "0", "--out", tmp + "/rllib.safetensors", "--runs-dir", tmp + "/runs", "--no-progress",
])
path, act = ppo.train_rllib(args)
policy = Policy.load(path)
env = gym.make("adactl/SpecDecode-v0", backend="replay", model="tiny", episode_steps=8)
obs, _ = env.reset(seed=5)
rng = np.random.default_rng(0)
for _ in range(50):
    assert policy.act(obs) == act(obs), "the exported file acts as RLlib's module does"
    obs = np.clip(obs + rng.normal(0, 0.2, obs.shape), 0, 1).astype(np.float32)
print("exported policy acts as trained")
"""


def test_rllib_policy_exports_in_our_format_and_serves(tmp_path):
    """RLlib PPO on two env runners of a local Ray cluster (tiny models, replay), in its own
    process (Ray's loggers keep the streams of the process they start in): the policy is
    exported in the same weights-only format, acts as RLlib's module does, and is served by
    `LearnedController`."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from adactl.runtime import Engine
    from adactl.runtime.models import perturbed_copy, tiny_llama

    if importlib.util.find_spec("ray") is None:  # found, not imported: Ray's loggers would keep pytest's streams
        pytest.skip('Ray is an optional extra: pip install -e ".[ray]"')
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", RLLIB_RUN, str(tmp_path)], cwd=root, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0 and "exported policy acts as trained" in run.stdout, run.stderr[-3000:]
    ctl = LearnedController(tmp_path / "rllib.safetensors", step_time=_tiny_step_time())
    engine = Engine(tiny_llama(), perturbed_copy(tiny_llama(), 0.03, 1))
    engine.add_request([1, 2, 3, 4], SamplingParams(8))
    results = ControlLoop(engine, schedule=[ctl]).run()
    assert len(results) == 1 and ctl.nonfinite == 0
    (runs,) = list((tmp_path / "runs").iterdir())
    scalars = set(EventAccumulator(str(runs)).Reload().Tags()["scalars"])
    assert {"adactl/policy_reward", "adactl/baseline_reward", "time/fps"} <= scalars


def test_rllib_without_ray_is_a_clear_message(monkeypatch, capsys):
    import importlib.util

    ppo = _script("ppo")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SystemExit):
        ppo.parse_args(["--trainer", "rllib"])
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


# ------------------------------------------------------------ per-row, traces
H100_ROWS = {"profile": "h100-llama-3.1-8b", "traces": "mixed", "per_row": True, "episode_steps": 8}


def test_per_row_env_replays_traces_and_drafts_by_each_requests_estimate():
    """SpecDecode-v0 in the GPU regime: recorded requests (both temperatures, their own prompt
    lengths), a cap and a threshold per step, each row drafting by its own estimate; the
    batch's actions are among them (tau = 0), and goodput-req picks the grid's best."""
    from adactl.controllers.observations import ROW_TAUS, row_actions
    from adactl.controllers.request_goodput import ragged_shape
    from adactl.estimators.gpu_cost import GpuStepCost
    from adactl.runtime.traces import RequestTrace

    env = gym.make("adactl/SpecDecode-v0", batch_sizes=(8,), reward="speedup", **H100_ROWS)
    u = env.unwrapped
    _no_warnings(env_checker.check_env, u)
    assert env.action_space.n == row_actions(4) == 1 + 4 * len(ROW_TAUS)
    assert isinstance(u.engine.step_time, GpuStepCost)  # the physics prices the replay, the fit the features
    env.reset(seed=0)
    state = u._state()
    assert len(state.running) == 8
    assert {v.sampling.temperature for v in state.running} == {0.0, 0.7}
    assert all(isinstance(r.trace, RequestTrace) for r in u.engine._rows)
    # each request runs its recorded length (up to the env's longest), not a stretched one
    assert all(r.sampling.max_new_tokens == min(r.trace.positions + 1, 256) for r in u.engine._rows)
    # tau = 0 is the batch action: every row with room drafts the batch's length
    assert u.baseline_action("no-spec") == 0
    assert set(u.features.lengths(state, u.baseline_action("fixed-k2")).tolist()) == {2}
    # a threshold tells rows apart by their own estimates
    ids = [v.request_id for v in state.running]
    u.features.rows.offset[ids[0]], u.features.rows.offset[ids[1]] = 4.0, -4.0
    a = 1 + 3 * len(ROW_TAUS) + ROW_TAUS.index(0.5)  # cap 4, tau 0.5
    lengths = u.features.lengths(state, a)
    assert lengths[0] == 4 and lengths[1] == 0
    obs, reward, _, _, info = env.step(a)
    assert env.observation_space.contains(obs) and reward > 0
    assert info["draft_len"] == pytest.approx(float(lengths.float().mean()))
    # goodput-req: no action of the grid has more expected tokens per predicted second
    state = u._state()
    survival, context = u.features.survival(state), sum(v.context_len for v in state.running)
    rates = []
    for a in range(env.action_space.n):
        c = u.features.lengths(state, a)
        tokens = sum(1 + float(survival[i, : int(n)].sum()) for i, n in enumerate(c))
        rates.append(tokens / float(u.backend.step_time.predict([ragged_shape(c, 0, context)])[0]))
    assert rates[u.baseline_action("goodput-req")] >= max(rates) * (1 - 1e-9)
    # the speedup reward: about 1 for plain decoding
    env.reset(seed=1)
    assert 0.8 < env.step(0)[1] < 1.2
    # bad input: a clear error for that call alone
    with pytest.raises(ValueError, match="action must be in 0..32"):
        env.step(33)
    with pytest.raises(ValueError, match="traces must be one of"):
        gym.make("adactl/SpecDecode-v0", traces="nope")
    with pytest.raises(ValueError, match="replayed"):
        gym.make("adactl/SpecDecode-v0", backend="real", model="tiny", traces="mixed")
    with pytest.raises(ValueError, match="reward"):
        gym.make("adactl/SpecDecode-v0", reward="nope")
    with pytest.raises(ValueError, match="traces record"):
        gym.make("adactl/SpecDecode-v0", traces="mixed", max_draft_len=8)
    with pytest.raises(ValueError, match="per-row action"):
        u.features.lengths(u._state(), 99)


def test_speedup_reward_prices_a_prefilling_step_without_its_prefill():
    """The prefill is paid whatever is drafted: on a step that prefills, the speedup reward is
    the tokens per second of the step less the prefill's predicted cost on plain decoding, over
    plain decoding's rate alone (`SunkPrefill` in the controllers). On the computed H100, 61 rows
    decoding beside a 449-token prompt: the step's own rate says k = 1, the decision's plain decoding."""
    from dataclasses import replace

    rewards, own = {}, {}
    for name in ("no-spec", "fixed-k1"):
        env = gym.make("adactl/SpecDecode-v0", batch_sizes=(64,), reward="speedup", noise=0.0,
                       **{**H100_ROWS, "episode_steps": 400})  # fmt: skip
        u = env.unwrapped
        env.reset(seed=3)
        while not (shape := u.features.shape(u._state(), 0)).prefill_tokens:
            env.step(0)
        _, rewards[name], _, _, info = env.step(u.baseline_action(name))
        alone = replace(shape, prefill_tokens=0, prefill_attention=0)
        plain, bare = (float(x) for x in u.backend.step_time.predict([shape, alone]))
        tokens, seconds = info["tokens_per_s"] * info["step_s"], info["step_s"]
        assert rewards[name] == pytest.approx(tokens / (seconds - (plain - bare)) / (shape.rows / bare))
        own[name] = info["tokens_per_s"] / (shape.rows / plain)  # the step's own rate over plain decoding's
    assert shape.prefill_tokens == 449 and plain > bare
    assert own["fixed-k1"] > own["no-spec"] and rewards["no-spec"] > rewards["fixed-k1"]


def test_trace_splits_are_disjoint_and_keep_the_mix():
    from adactl.envs.backends import _traces

    train, held, every = (_traces("mixed", s) for s in ("train", "heldout", "all"))
    assert not {id(t) for t in train.requests} & {id(t) for t in held.requests}
    assert len(train) + len(held) == len(every)
    kinds = [{(t.group, t.greedy) for t in ts.requests} for ts in (train, held)]
    assert kinds[0] == kinds[1] and len(kinds[0]) == 4


def _fixed_policy(path, action: int, obs_dim: int, n: int, env_kwargs: dict) -> None:
    """A policy file whose actor always picks `action` (a zero hidden layer, a biased head)."""
    from safetensors.torch import save_file

    bias = torch.zeros(n)
    bias[action] = 5.0
    tensors = {"policy.0.weight": torch.zeros(4, obs_dim), "policy.0.bias": torch.zeros(4),
               "action.weight": torch.zeros(n, 4), "action.bias": bias,
               "obs_mean": torch.zeros(obs_dim, dtype=torch.float64),
               "obs_var": torch.ones(obs_dim, dtype=torch.float64)}  # fmt: skip
    meta = {"format": "adactl-policy-v1", "env_id": "adactl/SpecDecode-v0",
            "action_space": json.dumps({"type": "Discrete", "n": n}), "obs_dim": str(obs_dim), "clip_obs": "10.0",
            "epsilon": "1e-8", "env_kwargs": json.dumps(env_kwargs)}  # fmt: skip
    save_file(tensors, str(path), metadata=meta)


def test_per_row_policy_serves_a_draft_length_per_request(tmp_path):
    """LearnedController with a per-row policy drafts each request by its own estimate, in the
    loop and on the replay, and `adactl export` turns it into a per-batch-size schedule."""
    from adactl.controllers.observations import ROW_TAUS, RowFeatures, row_actions
    from adactl.export import policy_schedule

    action = 1 + 3 * len(ROW_TAUS) + ROW_TAUS.index(0.5)  # cap 4, tau 0.5
    path = tmp_path / "rows.safetensors"
    _fixed_policy(path, action, RowFeatures(4, None).size, row_actions(4), {"per_row": True, "max_draft_len": 4})
    ctl = LearnedController(path, step_time=_tiny_step_time())
    assert ctl.per_row and isinstance(ctl.features, RowFeatures)
    engine = ReplayEngine(_tiny_step_time(), alpha=[0.6] * 4, seed=0)
    for i in range(4):
        engine.add_request(10 + i, SamplingParams(12, stop_on_eos=False))
    state = ScheduleState(0.0, tuple(engine.requests()), 4, StepPlan(draft_len=0, run=("req-0", "req-1", "req-2")))
    ids = ["req-0", "req-1", "req-2", "req-3"]
    ctl.features.rows.offset["req-0"], ctl.features.rows.offset["req-1"] = 4.0, -4.0
    plan = ctl.act(state)  # (requests not yet prefilled are not running, so the state has none)
    assert plan.draft_len == {}
    loop = ControlLoop(engine, schedule=[ctl], max_draft_len=4, clock=engine.clock)
    results = loop.run()
    assert sorted(results) == ids and all(len(r.output_ids) == 12 for r in results.values())
    assert not loop.fallbacks and ctl.nonfinite == 0
    # with rows running: each drafts by its own estimate, rows outside the plan's run get nothing
    engine = ReplayEngine(_tiny_step_time(), alpha=[0.6] * 4, seed=0)
    for i in range(4):
        engine.add_request(10 + i, SamplingParams(12, stop_on_eos=False))
    engine.step(StepPlan(draft_len=0, prefill_budget=4096))
    ctl = LearnedController(path, step_time=_tiny_step_time())
    ctl.features.rows.offset["req-0"], ctl.features.rows.offset["req-1"] = 4.0, -4.0
    running = tuple(engine.requests())
    plan = ctl.act(ScheduleState(0.0, running, 4, StepPlan(draft_len=0, run=("req-0", "req-1", "req-2"))))
    assert plan.draft_len["req-0"] == 4 and plan.draft_len["req-1"] == 0 and "req-3" not in plan.draft_len
    plan = ctl.act(ScheduleState(0.0, running, 2, StepPlan(draft_len=0)))  # a server allowing 2
    assert max(plan.draft_len.values()) <= 2
    schedule = policy_schedule(path, _tiny_step_time(), 8)
    assert len(schedule) == 8 and all(0 <= k <= 4 for (k,) in schedule)
    # a per-row file whose actions do not match its space: refused at load, not at the first step
    kwargs = {"per_row": True, "max_draft_len": 4}
    _fixed_policy(tmp_path / "short.safetensors", 0, RowFeatures(4, None).size, 5, kwargs)
    with pytest.raises(PolicyError, match="33"):
        LearnedController(tmp_path / "short.safetensors", step_time=_tiny_step_time())


def test_ppo_trains_per_row_on_traces_and_evaluates_held_out_requests(tmp_path):
    """`train/ppo.py --traces mixed --per-row`: training on every other recorded request, the
    evaluation on the others (and each domain's), at every batch size, beside goodput-req."""
    ppo = _script("ppo")
    args = ppo.parse_args([
        "--profile", "h100-llama-3.1-8b", "--traces", "mixed", "--per-row", "--reward", "speedup",
        "--total-timesteps", "128", "--n-steps", "64", "--batch-size", "64", "--n-envs", "1", "--n-epochs", "1",
        "--episode-steps", "4", "--eval-every", "100", "--eval-episodes", "1",
        "--out", str(tmp_path / "rows.safetensors"), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
    ])  # fmt: skip
    path, _ = ppo.train(args)
    report = ppo.compare(args, path)
    assert list(report) == [
        "training (mixed, replay)",
        *(f"held-out {t} requests (replay)" for t in ("mixed", "sharegpt", "humaneval")),
    ]
    for row in report.values():
        assert row["best_analytic"] in ppo.baselines(args) and "goodput-req" in row
        assert set(row["ratio_by_batch"]) == {"1", "2", "4", "8", "16", "32", "64"}
        assert all(r > 0 for r in row["ratio_by_batch"].values())
    assert LearnedController(path).per_row
    for bad in (["--traces", "mixed", "--backend", "real"], ["--traces", "nope"],
                ["--env-id", "adactl/Streaming-v0", "--per-row"], ["--reward", "nope"]):  # fmt: skip
        with pytest.raises(SystemExit):
            ppo.parse_args(bad)


def test_ppo_warm_start_clones_the_analytic_controller_and_keeps_it_while_the_critic_learns(tmp_path, monkeypatch):
    """`--warm-start goodput-req`: the actor fitted to the controller's own actions takes them on
    new episodes far more often than PPO from a random policy does; the `--critic-steps` of PPO
    that follow leave the clone's weights as they are, and the PPO steps after them move it."""
    from safetensors.torch import load_file

    ppo = _script("ppo")
    clones: list[list[torch.Tensor]] = []
    cloning = ppo.warm_start

    def keep_clone(model, venv, args):  # the real cloning; its weights kept to compare with the export
        result = cloning(model, venv, args)
        clones.append([p.detach().clone() for p in ppo.actor_parameters(model)])
        return result

    monkeypatch.setattr(ppo, "warm_start", keep_clone)
    common = ["--profile", "h100-llama-3.1-8b", "--traces", "mixed", "--per-row", "--reward", "speedup",
              "--batch-sizes", "1,2,4", "--n-steps", "64", "--batch-size", "64", "--n-envs", "1", "--n-epochs", "2",
              "--episode-steps", "16", "--eval-every", "100", "--eval-episodes", "1", "--runs-dir",
              str(tmp_path / "runs"), "--no-progress"]  # fmt: skip
    warm = ["--warm-start", "goodput-req", "--warm-start-steps", "2048"]
    runs = {  # name: (arguments, whether the actor is the clone at the end)
        "frozen": ([*warm, "--total-timesteps", "128", "--critic-steps", "128"], True),
        "moved": ([*warm, "--total-timesteps", "256", "--critic-steps", "128"], False),
        "cold": (["--total-timesteps", "256"], None),
    }
    policies = {}
    for name, (extra, is_clone) in runs.items():
        args = ppo.parse_args([*common, *extra, "--out", str(tmp_path / f"{name}.safetensors")])
        path, _ = ppo.train(args)
        policies[name] = Policy.load(path)
        if is_clone is not None:
            saved = load_file(str(path))
            exported = [saved[f"policy.{i}.{w}"] for i in range(2) for w in ("weight", "bias")]
            exported += [saved["action.weight"], saved["action.bias"]]
            same = all(torch.equal(a, b) for a, b in zip(exported, clones[-1]))
            assert same == is_clone, name
    assert len(clones) == 2
    (frozen_run,) = [d for d in (tmp_path / "runs").iterdir() if json.loads((d / "train.json").read_text())
                     ["args"]["out"].endswith("frozen.safetensors")]  # fmt: skip
    cloned = json.loads((frozen_run / "train.json").read_text())["warm_start"]

    env = gym.make("adactl/SpecDecode-v0", **ppo.env_kwargs(args))
    agreement = {}
    for name, policy in policies.items():  # every policy on the same states: the controller's own episodes
        same = total = 0
        for seed in (70, 71):
            for batch in (1, 2, 4):
                obs, _ = env.reset(seed=seed, options={"batch_size": batch})
                done = False
                while not done:
                    want = env.unwrapped.baseline_action("goodput-req")
                    same, total = same + int(policy.act(obs) == want), total + 1
                    obs, _, term, trunc, _ = env.step(want)
                    done = term or trunc
        agreement[name] = same / total
    # (at batch 1-4 one action is most of goodput-req's: the clone must do better than always taking it)
    assert cloned["agreement"] > cloned["most_common_action"] and cloned["agreement"] >= 0.9, cloned
    assert agreement["frozen"] >= 0.9 and agreement["frozen"] >= agreement["cold"] + 0.3, agreement
    with pytest.raises(SystemExit):
        ppo.parse_args(["--warm-start", "goodput-req"])  # goodput-req: per row only
    with pytest.raises(SystemExit):
        ppo.parse_args(["--env-id", "adactl/Streaming-v0", "--warm-start", "fcfs"])
    with pytest.raises(SystemExit):
        ppo.parse_args([*common, *warm, "--total-timesteps", "64", "--critic-steps", "128"])
