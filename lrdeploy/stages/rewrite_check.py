"""The written model really changed what the report says it changed: the report's layer records claim a number
of weight parameters removed (splits, narrowed and dropped layers); the written model's matrices must have shrunk
by at least that much against the graph the build rewrote. A claimed change that is not in the file (a "dropped"
block still there) is a bug of lrdeploy, never a success.

    matrices(rewritten graph) − matrices(written model)  ≥  Σ (params_before − params_after) over the records

(≥, not =: a drop also removes matrices that are no linear layer's, e.g. T5's relative position table)."""

from __future__ import annotations

from lrdeploy.errors import InternalError
from lrdeploy.report.model import LayerRecord

CHANGED = ("factorized", "narrowed", "dropped")


def check_claimed_changes(matrices_before: int, matrices_after: int, layers: list[LayerRecord]) -> None:
    """Raise InternalError when the written model kept weight parameters the report says are gone."""
    changed = [layer for layer in layers if layer.status in CHANGED]
    claimed = sum(layer.params_before - layer.params_after for layer in changed)
    removed = matrices_before - matrices_after
    if removed < claimed:
        names = ", ".join(f"{layer.name} ({layer.status})" for layer in changed[:4])
        raise InternalError(f"the report claims {claimed:,} weight parameters removed, but the written model's "
                            f"matrices shrank by {removed:,}: a rewrite did not happen as reported (changed layers: "
                            f"{names}{', …' if len(changed) > 4 else ''})")
