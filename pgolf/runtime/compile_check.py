"""Recompilation check for the compiled training step (train.compile).

torch.compile specialises the step to its shapes and guards; a training step that builds a
new graph after warmup (a shape, dtype or Python value it specialised on changed) stalls for
seconds and may recur. The watch counts the graphs dynamo has built: read before and after
each timed step, any increase is reported once per step so the log names the step that
recompiled. Validation compiles its own shapes outside the watched steps and is not counted.
"""

from __future__ import annotations


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class RecompileWatch:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.total = 0  # new graphs seen during watched steps
        self._before = 0

    def before_step(self) -> None:
        if self.enabled:
            self._before = compiled_graphs()

    def after_step(self) -> int:
        """New graphs compiled during the step just run (0 when disabled)."""
        if not self.enabled:
            return 0
        new = compiled_graphs() - self._before
        self.total += new
        return new
