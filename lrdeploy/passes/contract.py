"""The one contract every graph pass keeps, in the style of ONNX Runtime's fusions and onnxscript's rewriter:

    match (reads the graph only) ─► Matches: what was found, and every candidate refused with its reason
    check (the caller's: options, budgets)
    commit (edits the graph in place) ─► PassResult: what changed, counted; the graph left clean (cleanup, toposort)

`lrdeploy inspect` shows the refusals, so a user learns why a block or layer was not taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import onnx_graphsurgeon as gs

T = TypeVar("T")


@dataclass
class PassResult:
    """Whether a pass changed the graph, and what it counted."""

    changed: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """A candidate a matcher looked at and did not take: what it was (a layer or block name) and why."""

    candidate: str
    reason: str


@dataclass
class Matches(Generic[T]):
    """What a matcher found, in model order, and what it refused."""

    found: list[T] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def refuse(self, candidate: str, reason: str) -> None:
        self.refused.append(Refusal(candidate, reason))


def committed(graph: gs.Graph, **counts: int) -> PassResult:
    """End a commit: clean the graph up (what the rewrite left unused goes) and say what was done."""
    graph.cleanup().toposort()
    return PassResult(changed=any(counts.values()), counts=dict(counts))
