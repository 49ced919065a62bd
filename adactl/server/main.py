"""`adactl serve`: load the models and the controller stack, then serve on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adactl import settings
from adactl.settings import DeviceSettings, ProfileSettings, ServerLimits, setting
from adactl.stacks import (
    DEFAULT_STACK,
    NAMES,
    StackContext,
    build_stack,
    costs_steps,
    drafts,
    needs_companion,
    one_stack,
)


@dataclass(frozen=True)
class ServeSettings(ServerLimits, DeviceSettings, ProfileSettings):
    """`adactl serve`."""

    model: str = setting("smollm2", "target model spec (default: the embedded SmolLM2-135M)")
    draft: str = setting("draft", "draft model spec; 'none' for no speculation (stacks that never draft load none)")
    companion: str = setting("companion", "the companion draft (stacks with sv/adaserve)")
    controllers: str = setting(DEFAULT_STACK, f"controller stack, comma-separated ({NAMES}; adactl stacks)",
                               parse=one_stack)  # fmt: skip
    served_model_name: str | None = setting(None, "the model id clients name (default: from --model)")
    host: str = setting("127.0.0.1", "listen address (default: loopback only)")
    port: int = setting(8000, "listen port")
    max_queue_wait: float = setting(60.0, "seconds a request may wait to start")
    max_draft_len: int = setting(8, "draft tokens per row per step, at most")
    prefill_budget: int = setting(512, "prompt tokens per step (the safe default)")
    log_level: str = setting("info", "uvicorn's and adactl's log level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, ServeSettings)


def served_name(model: str) -> str:
    from adactl.runtime.models import DEFAULT_ALIASES, SMOLLM2_DIR

    return SMOLLM2_DIR if model in DEFAULT_ALIASES else Path(model).name or model


def stack_context(args: ServeSettings, pair: Any) -> StackContext:
    """The shipped acceptance estimators and this machine's step costs (`--profile`), refined online."""
    from adactl.estimators import load_acceptance
    from adactl.profiler import step_cost_for

    step_time = None
    if costs_steps(args.controllers):
        step_time = step_cost_for(pair, args.profile, args.refine, max_batch=args.max_batch)
    return StackContext(step_time, load_acceptance, args.prefill_budget)


def build_server(args: ServeSettings) -> Any:
    """The `OpenAIServer` (its FastAPI app in `.app`) that `args` describe."""
    from adactl.runtime.device import device_and_dtype
    from adactl.runtime.models import load_pair

    from .service import ServiceConfig

    has_draft = args.draft not in ("", "none") and drafts(args.controllers)  # names checked before models load
    companion = needs_companion(args.controllers)
    if companion and not has_draft:
        raise ValueError(f"--controllers {args.controllers} verifies with a companion: it needs a draft (--draft)")
    device, dtype = device_and_dtype(args.device, args.dtype)  # and the device
    draft, companion_spec = (args.draft if has_draft else None), (args.companion if companion else None)
    pair = load_pair(args.model, draft, companion_spec, device, dtype)
    stack = build_stack(args.controllers, stack_context(args, pair))
    loaded = pair.target
    return assemble(
        loaded.model, pair.speculator(stack.needs_companion), loaded.tokenizer, stack,
        args.served_model_name or served_name(args.model), max_batch=args.max_batch,
        max_draft_len=args.max_draft_len if has_draft else 0, prefill_budget=args.prefill_budget,
        service=ServiceConfig(args.max_queue, args.max_queue_wait),
    )  # fmt: skip


def assemble(model: Any, draft: Any, tokenizer: Any, stack: Any, name: str, max_batch: int = 64,
             max_draft_len: int = 8, prefill_budget: int = 512, service: Any = None) -> Any:  # fmt: skip
    """engine -> control loop (the stack's controllers) -> engine service -> OpenAI server:
    the wiring of `adactl serve` and of `adactl bench serve --tiny`."""
    from adactl.loop import ControlLoop
    from adactl.runtime import Engine, EngineConfig

    from .api import OpenAIServer
    from .service import EngineService, ServiceConfig

    engine = Engine(model, draft, tokenizer, EngineConfig(max_batch_size=max_batch))
    if engine.graphs is not None:  # every row at start-up: a growing batch would drop the graphs on each growth
        engine.reserve(max_batch, 1)
        t0 = time.perf_counter()
        lengths = range(min(max_draft_len, engine.config.shapes.tokens[-1] - 1) + 1) if draft is not None else [0]
        try:  # the decode and verify graphs now, not while the first requests wait
            captured = engine.warm_up(draft_lens=list(lengths))
            logging.getLogger(__name__).info("captured %d CUDA graphs in %.1f s", captured, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the server still serves, capturing on first use
            logging.getLogger(__name__).warning("CUDA graph warm-up failed (%s): graphs are captured on first use", e)
    loop = ControlLoop(engine, stack.schedule, stack.verify, max_draft_len=max_draft_len if draft is not None else 0,
                       prefill_budget=prefill_budget)  # fmt: skip
    return OpenAIServer(EngineService(loop, config=service or ServiceConfig()), tokenizer, name, engine.max_context)


def main(namespace: argparse.Namespace) -> None:
    import uvicorn

    args = settings.from_args(ServeSettings, namespace)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args)
    from adactl.runtime import freeze_heap

    freeze_heap()  # loaded and warmed up: no full collection walks the models' objects while it serves
    print(f"adactl serve: {server.model_name} with [{args.controllers}] on http://{args.host}:{args.port}/v1")
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
