"""Train a PPO controller (stable-baselines3) in an adactl environment; watch it in TensorBoard.

    python train/ppo.py                                     # SpecDecode-v0 on the replay backend
    python train/ppo.py --env-id adactl/Streaming-v0 --total-timesteps 100000
    python train/ppo.py --finetune-timesteps 2048           # then a short fine-tune on the real engine
    python train/ppo.py --profile h100-llama-3.1-8b --traces mixed --per-row   # the GPU regime, per row
    python train/ppo.py ... --per-row --warm-start goodput-req   # PPO from a clone of the controller
    tensorboard --logdir runs

cleanrl-style: every option is a field of `Args` (`--help` lists them). Rollouts run in
`--n-envs` `SubprocVecEnv` workers (spawn) behind `VecNormalize`. TensorBoard logs go to
`runs/{env}__{exp_name}__{seed}__{time}`: SB3's rollout/ and train/ scalars, and ours under
adactl/ per rollout (tokens/s, accepted length, action histogram, step-time estimator error,
miss rate) plus, every `--eval-every` rollouts, the policy's and the analytic baseline's
reward on the same held-back episodes (same seeds), the hyperparameters as a table, and a
figure of the policy (action against its key observation).

The policy is saved weights-only (safetensors + normalisation statistics; see
`adactl.controllers.learned`) in the run directory (`policy.safetensors`; shipping one is an
explicit `--out models/policies/SpecDecode-v0.safetensors`), then evaluated against the
analytic controllers on the training workload (replay) and on held-out prompts (ShareGPT
held-out records and HumanEval) on the real engine: one episode per prompt set and controller
per 100,000 training steps, at most 2 (none for a short run; `--heldout-episodes N` asks),
announced with its episode count and estimated time before it starts. With `--traces`
(SpecDecode-v0 on the replay of the default pair's recorded per-request acceptance, the GPU
regime with `--profile h100-llama-3.1-8b`), training sees every other recorded request and
the held-out evaluation replays the others (and, for `mixed`, each domain's), every
episode at every batch size. A run writes nothing outside its run directory unless `--out`
says so.
"""

# (no `from __future__ import annotations`: dataclass fields keep real types, and the script
# also loads as a module outside sys.modules, as the tests load it)
import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adactl import metrics


@dataclass
class Args:
    env_id: str = field(
        default="adactl/SpecDecode-v0", metadata={"help": "adactl/SpecDecode-v0 or adactl/Streaming-v0"}
    )
    backend: str = field(default="replay", metadata={"help": "replay (fast, deterministic) or real (the engine)"})
    model: str = field(default="default", metadata={"help": "default models, or tiny random ones (smoke runs)"})
    exp_name: str = field(default="ppo", metadata={"help": "experiment name in the run directory"})
    seed: int = field(default=1, metadata={"help": "seed of PPO, the envs and the evaluation"})
    total_timesteps: int = field(default=200_000, metadata={"help": "env steps on --backend"})
    finetune_timesteps: int = field(default=0, metadata={"help": "then this many env steps on the real engine"})
    n_envs: int = field(default=2, metadata={"help": "parallel env workers (SubprocVecEnv, spawn; 1: in-process)"})
    learning_rate: float = field(default=3e-4, metadata={"help": "Adam step size"})
    n_steps: int = field(default=512, metadata={"help": "steps per env per rollout"})
    batch_size: int = field(default=256, metadata={"help": "minibatch size"})
    n_epochs: int = field(default=10, metadata={"help": "epochs per rollout"})
    gamma: float = field(default=0.9, metadata={"help": "discount (a step's decision acts mostly on that step)"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip_range: float = field(default=0.2, metadata={"help": "PPO clip range"})
    ent_coef: float = field(default=0.01, metadata={"help": "entropy bonus"})
    net_arch: str = field(default="64,64", metadata={"help": "hidden layer widths of the actor and critic"})
    episode_steps: int = field(default=64, metadata={"help": "SpecDecode-v0: engine steps per episode"})
    batch_sizes: str = field(default="", metadata={
        "help": "SpecDecode-v0: concurrencies an episode draws from, comma-separated (default: the env's, "
                "1-64)"})  # fmt: skip
    max_draft_len: int = field(default=4, metadata={"help": "SpecDecode-v0: largest draft length"})
    acceptance_jitter: float = field(
        default=0.5, metadata={"help": "SpecDecode-v0, replay: per-episode acceptance factor 1 +- this"}
    )
    traces: str = field(default="", metadata={
        "help": "SpecDecode-v0, replay: requests follow the shipped per-request acceptance traces of sharegpt, "
                "humaneval or mixed (training: every other request; held out: the rest)"})  # fmt: skip
    reward: str = field(default="tokens", metadata={
        "help": "SpecDecode-v0: tokens (tokens/s / 100) or speedup (over plain decoding's predicted rate, about 1 "
                "at every batch size)"})  # fmt: skip
    per_row: bool = field(default=False, metadata={
        "help": "SpecDecode-v0: a cap and an acceptance threshold per step, each request drafting by its own "
                "estimate (compared with goodput-req too)"})  # fmt: skip
    warm_start: str = field(default="", metadata={
        "help": "SpecDecode-v0, sb3: before PPO, clone this analytic controller (e.g. goodput-req) into the policy "
                "from --warm-start-steps of its own actions, then train the critic alone on the clone for "
                "--critic-steps (default: none, PPO from a random policy)"})  # fmt: skip
    warm_start_steps: int = field(default=20_480, metadata={
        "help": "--warm-start: env steps of the analytic controller's actions the clone learns from"})  # fmt: skip
    critic_steps: int = field(default=10_240, metadata={
        "help": "--warm-start: PPO steps (part of --total-timesteps) with the cloned actor frozen, so that the "
                "critic learns its values before the actor's updates read them"})  # fmt: skip
    eval_every: int = field(default=5, metadata={"help": "rollouts between policy-vs-baseline evaluations"})
    eval_episodes: int = field(default=8, metadata={"help": "episodes per evaluation"})
    heldout_episodes: int = field(default=-1, metadata={
        "help": "real-engine episodes per held-out prompt set and controller (each at a batch size or load drawn "
                "per episode); -1: one per 100,000 training steps, at most 2"})  # fmt: skip
    out: str = field(default="", metadata={"help": "policy file (default: policy.safetensors in the run directory)"})
    runs_dir: str = field(default="runs", metadata={"help": "TensorBoard root; each run gets its own directory"})
    eval_only: bool = field(default=False, metadata={"help": "skip training: compare the policy at --out (default: "
                                                     "the shipped one), results in a new run directory"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    trainer: str = field(default="sb3", metadata={"help": "sb3 (stable-baselines3, this machine) or rllib (Ray "
                                                  "RLlib: --n-envs env runners, on a Ray cluster with --address)"})
    address: str = field(default="", metadata={"help": "rllib: a Ray cluster to join (default: start a local one)"})
    gpus_per_runner: float = field(default=0.0, metadata={"help": "rllib: GPUs per env runner (real backend: one "
                                                          "engine per GPU)"})
    device: str = field(default="auto", metadata={"help": "real backend: auto (cuda when available), cpu, cuda"})
    dtype: str = field(default="auto", metadata={"help": "real backend: auto (bfloat16 on CUDA, else float32), ..."})
    profile: str = field(
        default="",
        metadata={
            "help": "a step-cost profile file (adactl profile): the replay's costs (e.g. a GPU's), or the real "
            "backend's cost features (default: the shipped CPU model for replay, this machine's for real)"
        },
    )


def parse_args(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=f"{f.metadata['help']} (default {f.default})")
    args = Args(**vars(p.parse_args(argv)))
    if args.env_id not in ENV_SETTINGS:
        p.error(f"--env-id must be one of {sorted(ENV_SETTINGS)}")
    if args.backend not in ("replay", "real"):
        p.error("--backend must be replay or real")
    if args.traces and (args.env_id != "adactl/SpecDecode-v0" or args.backend != "replay" or args.model != "default"
                        or args.finetune_timesteps > 0):
        p.error("--traces: SpecDecode-v0 on the replay of the default models (no real-engine fine-tune)")
    from adactl.envs.backends import TRACE_SETS
    from adactl.envs.spec_decode import REWARDS

    if args.traces and args.traces not in TRACE_SETS:
        p.error(f"--traces must be one of {', '.join(TRACE_SETS)}")
    if (args.per_row or args.reward != "tokens") and args.env_id != "adactl/SpecDecode-v0":
        p.error("--per-row and --reward: SpecDecode-v0 only")
    if args.reward not in REWARDS:
        p.error(f"--reward must be one of {', '.join(REWARDS)}")
    try:
        if any(int(b) < 1 for b in args.batch_sizes.split(",") if args.batch_sizes):
            raise ValueError
    except ValueError:
        p.error(f"--batch-sizes: positive integers, comma-separated, got {args.batch_sizes!r}")
    if args.warm_start:
        if args.env_id != "adactl/SpecDecode-v0" or args.trainer != "sb3":
            p.error("--warm-start: SpecDecode-v0 with --trainer sb3 (Streaming's analytic stacks choose no action)")
        if args.warm_start not in baselines(args):
            p.error(f"--warm-start must be one of {', '.join(baselines(args))}, got {args.warm_start!r}")
        if args.warm_start_steps < 1 or not 0 <= args.critic_steps <= args.total_timesteps:
            p.error("--warm-start-steps must be >= 1 and --critic-steps between 0 and --total-timesteps")
    if args.heldout_episodes < -1:
        p.error("--heldout-episodes must be >= 0, or -1 to scale it with the training")
    if args.trainer not in ("sb3", "rllib"):
        p.error("--trainer must be sb3 or rllib")
    if args.trainer == "rllib":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            p.error('--trainer rllib needs Ray: pip install -e ".[ray]"')
        if args.finetune_timesteps > 0:
            p.error("--finetune-timesteps: sb3 only (train rllib on --backend real instead)")
    from adactl.estimators.step_cost import ProfileError, StepCostProfile
    from adactl.profiler import named_profile
    from adactl.runtime.device import DeviceError, device_and_dtype

    try:  # before any env or model is made
        if args.backend == "real" or args.finetune_timesteps > 0:
            device_and_dtype(args.device, args.dtype)
        if args.profile:
            StepCostProfile.load(named_profile(args.profile))
    except (DeviceError, ProfileError) as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------- environments
ENV_SETTINGS: dict[str, dict[str, Any]] = {
    "adactl/SpecDecode-v0": {
        "baselines": ["goodput", "no-spec", "fixed-k1", "fixed-k2", "fixed-k3", "fixed-k4"],
        "key": (0, "running requests"),
    },
    "adactl/Streaming-v0": {
        "baselines": ["fcfs", "fcfs-seqs16", "progressserve,ttft-budget"],
        "key": (3, "arrivals / s"),
    },
}


def baselines(args: Args) -> list[str]:
    """The analytic controllers the policy is compared with."""
    names = list(ENV_SETTINGS[args.env_id]["baselines"])
    return [names[0], "goodput-req", *names[1:]] if args.per_row else names


def env_kwargs(args: Args, backend: str | None = None, prompts: str = "sharegpt", split: str = "train",
               traces: str = "") -> dict[str, Any]:  # fmt: skip
    """The environment's arguments; with --traces, `traces` (default: --traces) and `split` say
    which recorded requests it replays."""
    kwargs: dict[str, Any] = {
        "backend": backend or args.backend,
        "model": args.model,
        "prompts": prompts,
        "device": args.device,
        "dtype": args.dtype,
        "profile": args.profile or None,
    }
    if args.env_id == "adactl/SpecDecode-v0":
        kwargs |= {"episode_steps": args.episode_steps, "max_draft_len": args.max_draft_len}
        if args.batch_sizes:
            kwargs["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
        if args.per_row:
            kwargs["per_row"] = True
        if args.reward != "tokens":
            kwargs["reward"] = args.reward
        if args.traces:
            kwargs |= {"traces": traces or args.traces, "trace_split": split}
        elif kwargs["backend"] == "replay":
            kwargs["acceptance_jitter"] = args.acceptance_jitter
    elif args.model == "tiny":
        kwargs |= {"episode_requests": 8}
    return kwargs


def make_env(env_id: str, kwargs: dict[str, Any], seed: int) -> Any:
    def thunk() -> Any:
        import gymnasium as gym

        import adactl.envs  # noqa: F401  (registers the ids)

        env = gym.make(env_id, **kwargs)
        env.reset(seed=seed)
        return env

    return thunk


def policy_episode(env: Any, act: Any, seed: int, **reset_options: Any) -> tuple[float, list[tuple[Any, Any]]]:
    """Total reward of one episode with `act(obs) -> action` (and its (obs, action) pairs)."""
    obs, _ = env.reset(seed=seed, options=reset_options or None)
    total, done, pairs = 0.0, False, []
    while not done:
        a = act(obs)
        pairs.append((obs, a))
        obs, r, term, trunc, _ = env.step(a)
        total, done = total + float(r), term or trunc
    return total, pairs


def baseline_episode(env: Any, name: str, seed: int, **reset_options: Any) -> tuple[float, list[tuple[Any, Any]]]:
    """The same for an analytic controller: SpecDecode asks the env for its action; Streaming
    runs the baseline's own stack (chosen at reset; the action is ignored)."""
    from adactl.envs.streaming import default_action

    u = env.unwrapped
    if hasattr(u, "ps"):
        return policy_episode(env, lambda obs: default_action(), seed, baseline=name, **reset_options)
    return policy_episode(env, lambda obs: u.baseline_action(name), seed, **reset_options)


# --------------------------------------------------------------- logging
def adactl_callback(args: Args, eval_env: Any) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Figure, HParam

    settings = ENV_SETTINGS[args.env_id]

    class AdactlCallback(BaseCallback):
        """Our scalars per rollout, the baseline comparison, hyperparameters, a policy figure."""

        def __init__(self) -> None:
            super().__init__()
            self.infos: list[dict[str, Any]] = []
            self.actions: list[np.ndarray] = []
            self.rollouts = 0
            self.last_eval: dict[str, float] = {}

        def _on_training_start(self) -> None:
            hparams = {k: v for k, v in dataclasses.asdict(args).items() if isinstance(v, (int, float, str, bool))}
            metrics = {"adactl/policy_reward": 0.0, "adactl/reward_ratio": 0.0, "rollout/ep_rew_mean": 0.0}
            self.logger.record("hparams", HParam(hparams, metrics), exclude=("stdout", "log", "json", "csv"))

        def _on_step(self) -> bool:
            self.infos.extend(self.locals.get("infos", []))
            self.actions.append(np.asarray(self.locals["actions"]).reshape(len(self.locals["infos"]), -1))
            return True

        def _on_rollout_end(self) -> None:
            infos = [i for i in self.infos if i]
            rec = self.logger.record
            for key, name in ((metrics.TOKENS_PER_S, metrics.TOKENS_PER_S), ("accepted_len", "accepted_len"),
                              ("step_time_error", "estimator_error"), ("in_flight", "in_flight")):  # fmt: skip
                values = [i[key] for i in infos if key in i]
                if values:
                    rec(metrics.tensorboard(name), float(np.mean(values)))
            if any("misses" in i for i in infos):
                misses = sum(i["misses"] for i in infos)
                rec(metrics.tensorboard(metrics.MISS_RATE), misses / max(misses + sum(i["on_time"] for i in infos), 1))
            if self.actions:
                acts = np.concatenate(self.actions)
                for j in range(acts.shape[1]):
                    rec(
                        f"adactl/action_hist_{j}",
                        acts[:, j].astype(np.float64),
                        exclude=("stdout", "log", "json", "csv"),
                    )
                    rec(f"adactl/action_mean_{j}", float(acts[:, j].mean()))
            self.infos, self.actions = [], []
            self.rollouts += 1
            if self.rollouts % args.eval_every == 0:
                self.evaluate()

        def _on_training_end(self) -> None:
            self.evaluate()

        def evaluate(self) -> None:
            act = deterministic_act(self.model, self.training_env)
            seeds = [10_000 + i for i in range(args.eval_episodes)]
            policy, pairs = [], []
            for s in seeds:
                r, p = policy_episode(eval_env, act, s)
                policy.append(r)
                pairs += p
            base = {b: np.mean([baseline_episode(eval_env, b, s)[0] for s in seeds]) for b in baselines(args)}
            best = max(base, key=lambda b: base[b])
            self.last_eval = {"policy": float(np.mean(policy)), "best_baseline": float(base[best])}
            self.logger.record("adactl/policy_reward", float(np.mean(policy)))
            self.logger.record("adactl/baseline_reward", float(base[best]))
            self.logger.record("adactl/reward_ratio", float(np.mean(policy) / base[best]) if base[best] else 0.0)
            self.logger.record("adactl/policy", Figure(policy_figure(pairs, settings["key"]), close=True),
                               exclude=("stdout", "log", "json", "csv"))  # fmt: skip

    return AdactlCallback()


def policy_figure(pairs: list[tuple[Any, Any]], key: tuple[int, str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, label = key
    x = np.asarray([o[index] for o, _ in pairs])
    acts = np.asarray([np.asarray(a).reshape(-1) for _, a in pairs])
    fig, axes = plt.subplots(1, acts.shape[1], figsize=(4 * acts.shape[1], 3), squeeze=False)
    for j in range(acts.shape[1]):
        axes[0, j].scatter(x, acts[:, j] + np.random.default_rng(0).uniform(-0.15, 0.15, len(x)), s=4, alpha=0.4)
        axes[0, j].set_xlabel(f"observation {index}: {label} (normalised)")
        axes[0, j].set_ylabel(f"action {j}")
    fig.tight_layout()
    return fig


def deterministic_act(model: Any, vec_env: Any) -> Any:
    """obs -> the policy's most likely action, with the training normalisation applied."""

    def act(obs: np.ndarray) -> Any:
        norm = vec_env.normalize_obs(obs[None]) if hasattr(vec_env, "normalize_obs") else obs[None]
        a, _ = model.predict(norm, deterministic=True)
        return a[0]

    return act


# ------------------------------------------------------------- warm start
BC_EPOCHS = 30
"""Passes of the clone over its steps (about 2,000 minibatches of 256 at the default 20,480 steps:
a few seconds for the default 64-64 actor)."""


def actor_parameters(model: Any) -> list[Any]:
    """The PPO actor's own parameters (its MLP and action head; SB3's default `MlpPolicy` keeps
    the critic's apart, and its features extractor is a flatten)."""
    policy = model.policy
    return [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters()]


def warm_start(model: Any, venv: Any, args: Args) -> dict[str, float]:
    """Clone `--warm-start`'s analytic controller into the PPO actor (behaviour cloning); returns
    the clone's agreement with it on held-back steps.

    The controller acts for `--warm-start-steps` env steps through the training envs themselves,
    so the observation and return normalisation (`VecNormalize`) learn from those steps as from
    PPO's; the actor then fits its actions by cross-entropy on the observations as normalised at
    the end, 9 steps in 10 (the others held back). Why: PPO from a random policy reached 0.992 of
    `goodput-req` on the GPU regime's training workload (issue 34, 2026-12-07), all of the gap at
    batch 1-4, where the actions differ by a few percent of reward and a policy must find what the
    per-request allocation computes; started from the controller, PPO is left only the
    improvement to find. The critic is not fitted here: `_train` freezes the cloned actor for
    `--critic-steps` of PPO while the critic learns its values, since an untrained critic's
    advantages would push the clone by noise in its first updates."""
    import torch
    from tqdm import tqdm

    n, total = venv.num_envs, args.warm_start_steps
    seen, chosen = [], []
    venv.reset()
    bar = tqdm(total=total, desc=f"warm start: {args.warm_start}'s actions", unit="step", disable=not args.progress)
    while len(chosen) * n < total:
        actions = np.asarray(venv.env_method("baseline_action", args.warm_start), dtype=np.int64)
        seen.append(np.array(venv.get_original_obs(), dtype=np.float32))
        chosen.append(actions)
        venv.step(actions)
        bar.update(n)
    bar.close()
    x = torch.as_tensor(venv.normalize_obs(np.concatenate(seen)), dtype=torch.float32)
    y = torch.as_tensor(np.concatenate(chosen))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=g)
    held, fit = order[: max(1, len(y) // 10)], order[max(1, len(y) // 10):]
    policy, params = model.policy, actor_parameters(model)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    policy.set_training_mode(True)
    for _ in tqdm(range(BC_EPOCHS), desc="warm start: cloning", unit="epoch", disable=not args.progress):
        for batch in fit[torch.randperm(len(fit), generator=g)].split(args.batch_size):
            loss = -policy.get_distribution(x[batch]).log_prob(y[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        agree = [float((policy.get_distribution(x[i]).distribution.logits.argmax(-1) == y[i]).float().mean())
                 for i in (held, fit)]  # fmt: skip
    result = {"agreement": agree[0], "fit_agreement": agree[1],
              "most_common_action": float(torch.bincount(y[held]).max()) / len(held)}  # fmt: skip
    print(f"warm start: the clone takes {args.warm_start}'s action on {100 * agree[0]:.1f}% of {len(held)} "
          f"held-back steps ({100 * agree[1]:.1f}% of the {len(fit)} it fitted; its most common action alone: "
          f"{100 * result['most_common_action']:.1f}%)", flush=True)  # fmt: skip
    return result


# ----------------------------------------------------------------- export
def export_policy(model: Any, vec_env: Any, path: Path, args: Args) -> None:
    """Weights-only policy file (see `adactl.controllers.learned`)."""
    import torch
    from safetensors.torch import save_file

    policy = model.policy
    tensors: dict[str, torch.Tensor] = {}
    linears = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    for i, layer in enumerate(linears):
        tensors[f"policy.{i}.weight"] = layer.weight.detach().cpu().contiguous()
        tensors[f"policy.{i}.bias"] = layer.bias.detach().cpu().contiguous()
    tensors["action.weight"] = policy.action_net.weight.detach().cpu().contiguous()
    tensors["action.bias"] = policy.action_net.bias.detach().cpu().contiguous()
    rms = vec_env.obs_rms
    tensors["obs_mean"] = torch.as_tensor(rms.mean, dtype=torch.float64)
    tensors["obs_var"] = torch.as_tensor(rms.var, dtype=torch.float64)
    meta = _meta(args, model.action_space, int(model.observation_space.shape[0]), vec_env.clip_obs, vec_env.epsilon)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


# ------------------------------------------------------------- evaluation
HELDOUT_SETS = ("sharegpt-heldout", "humaneval")
STEPS_PER_HELDOUT_EPISODE = 100_000


def heldout_episodes(args: Args) -> int:
    """Real-engine episodes per held-out prompt set and controller: `--heldout-episodes`, or
    one per 100,000 training steps (replay and fine-tune together), at most 2."""
    if args.heldout_episodes >= 0:
        return args.heldout_episodes
    return min(2, (args.total_timesteps + args.finetune_timesteps) // STEPS_PER_HELDOUT_EPISODE)


def episodes_seconds(args: Args, prompts: str, seeds: list[int], step_time: Any) -> float:
    """How long the evaluation's episodes of one prompt set take, replayed (`ReplayEngine`) on
    `step_time`, the real engine's step costs: its time on the real engine, less model loading."""
    import gymnasium as gym

    env = gym.make(args.env_id, **env_kwargs(args, "replay", prompts))
    u = env.unwrapped
    u.backend.step_time = step_time  # the envs read it at reset: steps, prefills and features
    total = 0.0
    for s in seeds:
        policy_episode(env, lambda obs: env.action_space.sample(), s)
        total += u.backend.clock(u.engine)
        for b in baselines(args):
            baseline_episode(env, b, s)
            total += u.backend.clock(u.engine)
    env.close()
    return total


def compare(args: Args, path: Path) -> dict[str, Any]:
    """The saved policy (through `LearnedController`'s own `Policy`) against the analytic
    controllers: on the training workload (replay, held-back seeds) and on held-out prompts
    (real engine: ShareGPT held-out records and HumanEval), announced with its episode count
    and estimated length before it starts. With --traces, all in the replay: the training
    split's requests and the held-out split's (each domain's too for `mixed`), every seed at
    every batch size, with the ratio per batch size as well."""
    import gymnasium as gym
    from tqdm import tqdm

    import adactl.envs  # noqa: F401
    from adactl.controllers.learned import Policy

    policy = Policy.load(path)
    names = baselines(args)
    controllers = 1 + len(names)
    if args.traces:
        held = [args.traces, *(("sharegpt", "humaneval") if args.traces == "mixed" else ())]
        sets = [(f"training ({args.traces}, replay)", env_kwargs(args, "replay"), args.eval_episodes)]
        sets += [(f"held-out {t} requests (replay)", env_kwargs(args, "replay", split="heldout", traces=t),
                  args.eval_episodes) for t in held]  # fmt: skip
    else:
        sets = [("training (replay)", env_kwargs(args, "replay", "sharegpt"), args.eval_episodes)]
        heldout = heldout_episodes(args) if args.model != "tiny" else 0
        sets += [(f"held-out {p} (real)", env_kwargs(args, "real", p), heldout) for p in HELDOUT_SETS if heldout > 0]
        if heldout == 0 and args.model != "tiny":
            steps = args.total_timesteps + args.finetune_timesteps
            print(f"held-out evaluation on the real engine: none for {steps:,} "
                  f"training steps (one episode per prompt set and controller per {STEPS_PER_HELDOUT_EPISODE:,}, at "
                  "most 2); --heldout-episodes N asks for N", flush=True)  # fmt: skip
    report: dict[str, Any] = {}
    for label, kwargs, episodes in sets:
        env = gym.make(args.env_id, **kwargs)
        batches = list(env.unwrapped.batch_sizes) if args.traces else [None]
        runs = [(20_000 + i, b) for i in range(episodes) for b in batches]
        if kwargs["backend"] == "real" and kwargs["prompts"] == HELDOUT_SETS[0]:  # models loaded: announce it all
            step_time = env.unwrapped.backend.step_time
            seconds = sum(episodes_seconds(args, p, [s for s, _ in runs], step_time) for p in HELDOUT_SETS)
            print(f"held-out evaluation on the real engine: {len(HELDOUT_SETS)} prompt sets x {episodes} episodes x "
                  f"{controllers} controllers = {len(HELDOUT_SETS) * episodes * controllers} episodes, about "
                  f"{seconds / 60:.1f} min (the same episodes replayed on its step costs)", flush=True)  # fmt: skip
        bar = tqdm(total=len(runs) * controllers, desc=label, unit="episode", disable=not args.progress)
        by_batch: dict[str, dict[str, float]] = {}
        for name in ["learned", *names]:
            for s, b in runs:
                options = {"batch_size": b} if b is not None else {}
                if name == "learned":
                    reward = policy_episode(env, policy.act, s, **options)[0]
                else:
                    reward = baseline_episode(env, name, s, **options)[0]
                cell = by_batch.setdefault(str(b), {})
                cell[name] = cell.get(name, 0.0) + reward / episodes
                bar.update(1)
        bar.close()
        env.close()
        row: dict[str, Any] = {n: sum(c[n] for c in by_batch.values()) for n in ["learned", *names]}
        best = max(names, key=lambda b: row[b])
        row["best_analytic"] = best
        # a ratio needs a positive reference; with misses the streaming reward can go negative,
        # and then the margin says it (higher is better either way)
        row["ratio_to_best"] = row["learned"] / row[best] if row[best] > 0 else float("nan")
        row["margin_to_best"] = row["learned"] - row[best]
        if args.traces:
            row["ratio_by_batch"] = {  # each over the best analytic controller of its batch size
                b: c["learned"] / top if (top := max(c[n] for n in names)) > 0 else float("nan")
                for b, c in by_batch.items()
            }
            row["by_batch"] = by_batch
        report[label] = row
        others = "  ".join(f"{b} {row[b]:.2f}" for b in names)
        print(f"{label:32} learned {row['learned']:9.2f}  best analytic ({best}) {row[best]:9.2f}  "
              f"ratio {row['ratio_to_best']:.3f}  margin {row['margin_to_best']:+.2f}   [{others}]",
              flush=True)  # fmt: skip
        if args.traces:
            ratios = "  ".join(f"{b}: {r:.3f}" for b, r in row["ratio_by_batch"].items())
            print(f"    by batch size, over the best analytic of each: {ratios}")
    return report


# ------------------------------------------------------------------ main
def shipped_policy(args: Args) -> Path:
    """The policy `LearnedController` serves for this env (`--out` it to ship a new one)."""
    from adactl.runtime.models import SHIPPED_MODELS

    return SHIPPED_MODELS / "policies" / f"{args.env_id.split('/')[1]}.safetensors"


def new_run_dir(args: Args, kind: str = "") -> Path:
    """runs/{env}__{exp}{kind}__{seed}__{time}: TensorBoard logs, train.json, and the policy
    and its evaluation unless `--out` puts them elsewhere."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(args.runs_dir) / f"{args.env_id.replace('/', '-')}__{args.exp_name}{kind}__{args.seed}__{stamp}"


def train(args: Args, run_dir: Path | None = None) -> tuple[Path, Any]:
    """Train, save the policy (`--out`, else in `run_dir`); returns its path and the trained
    model's own deterministic `act(obs)` (SB3, with the training normalisation), to check the
    saved file against."""
    import torch

    run_dir = run_dir or new_run_dir(args)
    out = Path(args.out) if args.out else run_dir / "policy.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the env workers have the other cores; restored for the real-engine evaluation
    try:
        return _train(args, run_dir, out)
    finally:
        torch.set_num_threads(threads)  # a real engine's step costs are keyed by its thread count


def _train(args: Args, run_dir: Path, out: Path) -> tuple[Path, Any]:
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor, VecNormalize

    def vec(backend: str, n: int) -> Any:
        fns = [make_env(args.env_id, env_kwargs(args, backend), args.seed + i) for i in range(n)]
        return VecMonitor(SubprocVecEnv(fns, start_method="spawn") if n > 1 else DummyVecEnv(fns))

    venv = VecNormalize(vec(args.backend, args.n_envs), gamma=args.gamma)
    eval_env = make_env(args.env_id, env_kwargs(args, args.backend), args.seed + 999)()
    widths = [int(w) for w in args.net_arch.split(",") if w]
    model = PPO(
        "MlpPolicy", venv, learning_rate=args.learning_rate, n_steps=args.n_steps, batch_size=args.batch_size,
        n_epochs=args.n_epochs, gamma=args.gamma, gae_lambda=args.gae_lambda, clip_range=args.clip_range,
        ent_coef=args.ent_coef, seed=args.seed, device="cpu", policy_kwargs={"net_arch": widths},
    )  # fmt: skip
    model.set_logger(configure(str(run_dir), ["stdout", "tensorboard"] if args.progress else ["tensorboard"]))
    callback = adactl_callback(args, eval_env)
    t0 = time.perf_counter()
    steps, cloned = args.total_timesteps, {}
    if args.warm_start:
        cloned = warm_start(model, venv, args)
        for key, value in cloned.items():
            model.logger.record(f"adactl/warm_start_{key}", value)
    if args.warm_start and args.critic_steps > 0:  # the critic learns the clone's values, the clone frozen
        frozen = actor_parameters(model)
        for p in frozen:
            p.requires_grad_(False)
        model.learn(args.critic_steps, callback=callback, progress_bar=args.progress)
        for p in frozen:
            p.requires_grad_(True)
        steps -= model.num_timesteps
    if steps > 0:
        model.learn(steps, callback=callback, progress_bar=args.progress, reset_num_timesteps=not args.warm_start)
    if args.finetune_timesteps > 0:  # a short fine-tune on the real engine, normalisation carried over
        export_policy(model, venv, out.with_suffix(".replay.safetensors"), args)  # the replay-trained policy
        real = VecNormalize(vec("real", args.n_envs), gamma=args.gamma)
        real.obs_rms, real.ret_rms = venv.obs_rms, venv.ret_rms
        venv.close()
        venv = real
        model.set_env(venv)
        model.learn(args.finetune_timesteps, callback=callback, progress_bar=args.progress, reset_num_timesteps=False)
    minutes = (time.perf_counter() - t0) / 60
    export_policy(model, venv, out, args)
    venv.close()
    eval_env.close()
    print(f"trained in {minutes:.1f} min; policy -> {out}; TensorBoard: tensorboard --logdir {args.runs_dir}")
    (run_dir / "train.json").write_text(json.dumps({"minutes": minutes, "last_eval": callback.last_eval,
                                                    **({"warm_start": cloned} if cloned else {}),
                                                    "args": dataclasses.asdict(args)}, indent=1) + "\n")  # fmt: skip
    return out, deterministic_act(model, venv)


def train_rllib(args: Args, run_dir: Path | None = None) -> tuple[Path, Any]:
    """The same training on Ray RLlib (PPO, new API stack): `--n-envs` env runners, each with its
    own backend (`--gpus-per-runner` GPUs for a real engine each), on the cluster at `--address`
    or a local one. Observations are the features as they are (already in [0, 1]); the policy
    is exported in the same weights-only format, so `LearnedController` serves it unchanged."""
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    run_dir = run_dir or new_run_dir(args, "-rllib")
    out = Path(args.out) if args.out else run_dir / "policy.safetensors"
    env_name = args.env_id.replace("/", "-")
    register_env(env_name, lambda config: _adactl_env(args.env_id, config))
    import os

    joining = bool(args.address or os.environ.get("RAY_ADDRESS"))  # a cluster's resources are its own
    # on a cluster, every node needs adactl installed (pip install -e ".[ray]") and --profile's file
    ray.init(address=args.address or None, include_dashboard=False, log_to_driver=joining,
             **({} if joining else {"num_cpus": max(2, args.n_envs)}))  # fmt: skip
    widths = [int(w) for w in args.net_arch.split(",") if w]
    batch = args.n_steps * args.n_envs
    config = (
        PPOConfig()
        .environment(env=env_name, env_config=env_kwargs(args))
        .env_runners(num_env_runners=args.n_envs, rollout_fragment_length=args.n_steps, num_cpus_per_env_runner=1,
                     num_gpus_per_env_runner=args.gpus_per_runner)  # fmt: skip
        .training(train_batch_size_per_learner=batch, minibatch_size=args.batch_size, num_epochs=args.n_epochs,
                  lr=args.learning_rate, gamma=args.gamma, lambda_=args.gae_lambda, clip_param=args.clip_range,
                  entropy_coeff=args.ent_coef)  # fmt: skip
        .rl_module(model_config={"fcnet_hiddens": widths, "fcnet_activation": "tanh", "vf_share_layers": False})
        .debugging(seed=args.seed)
    )
    algo = config.build_algo()
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hparams", json.dumps(dataclasses.asdict(args), indent=1))
    eval_env = make_env(args.env_id, env_kwargs(args, args.backend), args.seed + 999)()
    seeds = [10_000 + i for i in range(args.eval_episodes)]
    base = {b: np.mean([baseline_episode(eval_env, b, s)[0] for s in seeds]) for b in baselines(args)}
    best = max(base, key=lambda b: base[b])
    t0, steps, rollouts, last_eval = time.perf_counter(), 0, 0, {}
    bar = tqdm(total=args.total_timesteps, desc="rllib ppo", unit="step", disable=not args.progress)
    while steps < args.total_timesteps:
        result = algo.train()
        runners = result.get("env_runners", {})
        now = int(runners.get("num_env_steps_sampled_lifetime", steps + batch))
        bar.update(now - steps)
        steps, rollouts = now, rollouts + 1
        elapsed = time.perf_counter() - t0
        if runners.get("episode_return_mean") is not None:
            writer.add_scalar("rollout/ep_rew_mean", float(runners["episode_return_mean"]), steps)
        writer.add_scalar("time/fps", steps / elapsed, steps)
        if rollouts % args.eval_every == 0 or steps >= args.total_timesteps:
            policy = _rllib_policy(algo, eval_env, args)
            mine = float(np.mean([policy_episode(eval_env, policy.act, s)[0] for s in seeds]))
            last_eval = {"policy": mine, "best_baseline": float(base[best])}
            writer.add_scalar(metrics.tensorboard("policy_reward"), mine, steps)
            writer.add_scalar(metrics.tensorboard("baseline_reward"), float(base[best]), steps)
            writer.add_scalar(metrics.tensorboard("reward_ratio"), mine / base[best] if base[best] else 0.0, steps)
    bar.close()
    minutes = (time.perf_counter() - t0) / 60
    export_rllib_policy(algo, eval_env, out, args)
    module, space = algo.get_module(), eval_env.action_space
    writer.close()
    algo.stop()
    ray.shutdown()
    eval_env.close()
    print(f"trained in {minutes:.1f} min ({steps / minutes / 60:.0f} env steps/s); policy -> {out}; "
          f"TensorBoard: tensorboard --logdir {args.runs_dir}")  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.json").write_text(json.dumps({"minutes": minutes, "env_steps": steps, "last_eval": last_eval,
                                                    "args": dataclasses.asdict(args)}, indent=1) + "\n")  # fmt: skip
    return out, _rllib_act(module, space)


def _rllib_act(module: Any, space: Any) -> Any:
    """RLlib's own deterministic action (the most likely one of each sub-space), to check the
    exported file against."""
    import torch

    sizes = [int(space.n)] if hasattr(space, "n") else [int(n) for n in space.nvec]

    def act(obs: np.ndarray) -> Any:
        with torch.no_grad():
            out = module.forward_inference({"obs": torch.as_tensor(obs, dtype=torch.float32)[None]})
        parts = [int(p.argmax()) for p in torch.split(out["action_dist_inputs"][0], sizes)]
        return parts[0] if hasattr(space, "n") else np.asarray(parts, dtype=np.int64)

    return act


def _adactl_env(env_id: str, config: dict[str, Any]) -> Any:
    import gymnasium as gym

    import adactl.envs  # noqa: F401  (registers the environments in this env runner's process)

    return gym.make(env_id, **dict(config)).unwrapped


def _rllib_tensors(algo: Any) -> dict[str, Any]:
    """The actor of RLlib's default PPO module in our policy format: its encoder's linear layers
    (tanh after each) and the policy head; identity normalisation (features are in [0, 1])."""
    import torch

    state = {k: torch.as_tensor(v).float() for k, v in algo.get_module().get_state().items()}
    layers = sorted({int(k.split(".")[-2]) for k in state if k.startswith("encoder.actor_encoder.net.mlp.")})
    tensors = {}
    for i, j in enumerate(layers):
        tensors[f"policy.{i}.weight"] = state[f"encoder.actor_encoder.net.mlp.{j}.weight"].contiguous()
        tensors[f"policy.{i}.bias"] = state[f"encoder.actor_encoder.net.mlp.{j}.bias"].contiguous()
    tensors["action.weight"] = state["pi.net.mlp.0.weight"].contiguous()
    tensors["action.bias"] = state["pi.net.mlp.0.bias"].contiguous()
    width = tensors["policy.0.weight"].shape[1]
    tensors["obs_mean"] = torch.zeros(width, dtype=torch.float64)
    tensors["obs_var"] = torch.full((width,), 1.0 - 1e-8, dtype=torch.float64)
    return tensors


def _meta(args: Args, space: Any, obs_dim: int, clip_obs: float, epsilon: float) -> dict[str, str]:
    action_space = {"type": "Discrete", "n": int(space.n)} if hasattr(space, "n") else {
        "type": "MultiDiscrete", "nvec": [int(n) for n in space.nvec]}  # fmt: skip
    return {
        "format": "adactl-policy-v1",
        "env_id": args.env_id,
        "action_space": json.dumps(action_space),
        "obs_dim": str(obs_dim),
        "clip_obs": str(float(clip_obs)),
        "epsilon": str(float(epsilon)),
        "env_kwargs": json.dumps({k: v for k, v in env_kwargs(args).items() if k != "backend"}),
        "args": json.dumps(dataclasses.asdict(args)),
    }


def _rllib_policy(algo: Any, env: Any, args: Args) -> Any:
    """The policy as `LearnedController` would load it from the exported file."""
    from adactl.controllers.learned import Policy

    return Policy(_rllib_tensors(algo), _meta(args, env.action_space, int(env.observation_space.shape[0]), 10.0, 1e-8))


def export_rllib_policy(algo: Any, env: Any, path: Path, args: Args) -> None:
    """An RLlib-trained policy, weights-only, in the format `LearnedController` loads."""
    from safetensors.torch import save_file

    meta = _meta(args, env.action_space, int(env.observation_space.shape[0]), 10.0, 1e-8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_rllib_tensors(algo), str(path), metadata=meta)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.eval_only:  # the results go to a new run directory, or beside an --out policy
        path = Path(args.out) if args.out else shipped_policy(args)
        results = path if args.out else new_run_dir(args, "-eval") / path.name
    else:
        path, _ = train_rllib(args) if args.trainer == "rllib" else train(args)
        results = path
    report = compare(args, path)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".eval.json").write_text(json.dumps(report, indent=1) + "\n")
    from adactl.runtime.device import describe, device_and_dtype

    if args.traces:
        where = f"replay of {args.profile or 'the shipped CPU model'}, {args.traces} traces"
    else:
        where = f"real backend on {describe(*device_and_dtype(args.device, args.dtype)).label}"  # held-out episodes
    plot_comparison(report, results.with_suffix(".eval.png"), f"{args.env_id}, {where}")
    print(f"evaluation -> {results.with_suffix('.eval.json')}")
    return report


def plot_comparison(report: dict[str, Any], path: Path, title: str) -> None:
    """Reward per controller, one panel per workload, relative to the best analytic one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(4.5 * len(report), 3.2), squeeze=False)
    for ax, (label, row) in zip(axes[0], report.items()):
        names = [k for k, v in row.items() if isinstance(v, float) and k not in ("ratio_to_best", "margin_to_best")]
        ax.bar(names, [row[n] for n in names], color=["C1" if n == "learned" else "C0" for n in names])
        ax.axhline(row[row["best_analytic"]], color="k", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("episode reward (higher is better)")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
