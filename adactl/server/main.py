"""`adactl serve`: load the models and the controller stack, then serve on 127.0.0.1."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from adactl.profiler import add_profile_arguments
from adactl.runtime.device import add_device_arguments
from adactl.stacks import DEFAULT_STACK, NAMES, StackContext, build_stack, costs_steps, drafts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="target model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--draft",
        default="draft",
        help="draft model spec; 'none' for no speculation (stacks that never draft load none)",
    )
    parser.add_argument("--companion", default="companion", help="the companion draft (stacks with sv/adaserve)")
    parser.add_argument("--controllers", default=DEFAULT_STACK, help=f"controller stack, comma-separated ({NAMES})")
    parser.add_argument("--served-model-name", default=None, help="the model id clients name (default: from --model)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=64, help="requests running or prefilling at once, at most")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a first token before 429s")
    parser.add_argument("--max-queue-wait", type=float, default=60.0, help="seconds a request may wait to start")
    parser.add_argument("--max-draft-len", type=int, default=8)
    parser.add_argument("--prefill-budget", type=int, default=512, help="prompt tokens per step (the safe default)")
    add_device_arguments(parser)
    add_profile_arguments(parser)
    parser.add_argument("--log-level", default="info")


def served_name(model: str) -> str:
    from adactl.runtime.models import DEFAULT_ALIASES, SMOLLM2_DIR

    return SMOLLM2_DIR if model in DEFAULT_ALIASES else Path(model).name or model


def stack_context(args: argparse.Namespace, pair: Any | None) -> StackContext:
    """The shipped acceptance estimators and this machine's step costs (`--profile`), refined
    online; `pair` None: names are being checked, nothing is measured."""
    from adactl.estimators import load_acceptance
    from adactl.profiler import step_cost_for

    step_time = None
    if pair is not None and costs_steps(args.controllers):
        step_time = step_cost_for(pair, args.profile, args.refine, max_batch=args.max_batch)
    return StackContext(step_time, load_acceptance, args.prefill_budget)


def build_server(args: argparse.Namespace) -> Any:
    """The `OpenAIServer` (its FastAPI app in `.app`) that `args` describe."""
    from adactl.runtime.device import device_and_dtype
    from adactl.runtime.models import load_pair

    from .service import ServiceConfig

    has_draft = args.draft not in ("", "none") and drafts(args.controllers)
    stack = build_stack(args.controllers, stack_context(args, None))  # names checked before loading models
    if stack.needs_companion and not has_draft:
        raise ValueError(f"--controllers {args.controllers} verifies with a companion: it needs a draft (--draft)")
    device, dtype = device_and_dtype(args.device, args.dtype)  # and the device
    companion = args.companion if stack.needs_companion else None
    pair = load_pair(args.model, args.draft if has_draft else None, companion, device, dtype)
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
    loop = ControlLoop(engine, stack.schedule, stack.verify, max_draft_len=max_draft_len if draft is not None else 0,
                       prefill_budget=prefill_budget)  # fmt: skip
    return OpenAIServer(EngineService(loop, config=service or ServiceConfig()), tokenizer, name, engine.max_context)


def main(args: argparse.Namespace) -> None:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(args)
    print(f"adactl serve: {server.model_name} with [{args.controllers}] on http://{args.host}:{args.port}/v1")
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
