"""The one registry of controller stacks: every name builds, means one controller, and every
command's stacks are registry stacks."""

import argparse
import dataclasses
import re

import pytest

from adactl import stacks
from adactl.bench import serve as bench_serve
from adactl.bench import spec as bench_spec
from adactl.bench import stream as bench_stream
from adactl.cli import main
from adactl.envs.streaming import BASELINES
from adactl.estimators.step_time import tiny_step_time
from adactl.runtime.types import TreeSpec
from adactl.stacks import REGISTRY, StackContext, build_stack, costs_steps, drafts, needs_companion, parse


def example(entry: stacks.Entry) -> str:
    """A concrete name for an entry: its numbers filled in."""
    return {"fcfs-seqs{N}": "fcfs-seqs8", "fixed-k{K}": "fixed-k3", "tree-d{D}w{W}n{N}": "tree-d3w2n6",
            "vllm-v1-seqs{N}-tokens{T}": "vllm-v1-seqs64-tokens2048"}.get(entry.shown, entry.shown)  # fmt: skip


@pytest.fixture(scope="module")
def ctx():
    return StackContext(tiny_step_time(), stacks.untrained_acceptance, prefill_budget=256, max_running=8)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.shown)
def test_every_name_builds_one_controller_of_its_role(entry, ctx):
    name = example(entry)
    assert re.fullmatch(entry.pattern, name)
    spec = name if entry.role == "schedule" else f"fixed-k2,{name}"
    built = build_stack(spec, ctx)
    if entry.role == "verify":
        assert built.verify is not None and len(built.schedule) == 1
        assert built.needs_companion == entry.companion == needs_companion(spec)
    else:
        assert len(built.schedule) == 1 and built.verify is None
        assert hasattr(built.schedule[0], "act")
    assert drafts(spec) == (entry.speculates or entry.role == "verify")
    assert costs_steps(spec) == entry.costs_steps
    # fresh controllers each time: two servers never share one's state
    again = build_stack(spec, ctx)
    assert (again.verify or again.schedule[0]) is not (built.verify or built.schedule[0])


def test_names_carry_their_numbers(ctx):
    fcfs, fixed = build_stack("fcfs-seqs8,fixed-k3", ctx).schedule
    (tree,) = build_stack("tree-d3w2n6", ctx).schedule
    assert fcfs.max_num_seqs == 8 and fcfs.prefill_budget == 256
    assert fixed.k == 3
    assert tree.spec == TreeSpec(3, 2, 6)
    assert not drafts("fixed-k0") and drafts("fixed-k1")


def test_bad_stacks_say_what_is_wrong(ctx):
    with pytest.raises(ValueError, match="unknown controller 'warp'"):
        build_stack("fcfs,warp", ctx)
    with pytest.raises(ValueError, match="goes last"):
        build_stack("sv,fcfs", ctx)
    with pytest.raises(ValueError, match="2 admission controllers"):
        build_stack("fcfs,fcfs-seqs16", ctx)  # a comma list of stacks, as commands took before: ';' now
    with pytest.raises(ValueError, match="2 draft-length controllers"):
        build_stack("goodput,fixed-k2,sv", ctx)
    with pytest.raises(ValueError, match="at least one"):
        build_stack(" , ", ctx)
    with pytest.raises(ValueError, match="needs a step_time"):
        build_stack("goodput", StackContext(None, stacks.untrained_acceptance))
    with pytest.raises(ValueError, match="needs `acceptance`"):
        build_stack("goodput", StackContext(tiny_step_time()))
    with pytest.raises(argparse.ArgumentTypeError, match="unknown controller"):
        stacks.stack_list("fcfs;fcfs,warp")
    assert stacks.stack_list("fcfs; fixed-k4,sv;") == ["fcfs", "fixed-k4,sv"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.prefill_budget = 1  # type: ignore[misc]


def test_every_command_names_registry_stacks():
    """One vocabulary: the benches, the server's default and the environments' baselines."""
    tree = TreeSpec(2, 2, 4)
    everywhere = [
        *bench_spec.stacks([1, 2, 4], 6),
        *bench_spec.tree_stacks([tree], tree),
        *bench_stream.stacks([8, 16]),
        *bench_serve.STACKS,
        *BASELINES,
        stacks.DEFAULT_STACK,
        "slo,adaserve",
        "slo-tree,adaserve-conf",
    ]
    for spec in everywhere:
        assert parse(spec), spec
    assert not any(drafts(b) for b in BASELINES)


def test_adactl_stacks_lists_every_name(capsys):
    assert main(["stacks"]) == 0
    out = capsys.readouterr().out
    for entry in REGISTRY:
        assert entry.shown in out and entry.summary in out
