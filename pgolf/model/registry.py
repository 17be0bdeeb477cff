"""The model's slots: where a technique plugs in, chosen by a config key.

GPT.hidden_states is a fixed skeleton; each slot below is a dict name -> builder, filled by
one decorator line in the module that implements the entry:

    embed -> embedding add-ons -> norm -> post-norm add-ons = x0 -> blocks in the layout's order -> norm
                                          each: attention (with its position), mlp

| slot            | config key              | builder(...) -> what                 | forward protocol                        |
|-----------------|-------------------------|--------------------------------------|-----------------------------------------|
| embedding_addon | model.embed = [names]   | (cfg) -> nn.Module                   | (x, input_ids) -> x, before the norm    |
| post_norm_addon | model.post_norm = [...] | (cfg) -> nn.Module                   | (x, input_ids) -> x, after the norm;    |
|                 |                         |                                      | its output is x0                        |
| stream_addon    | model.stream = [names]  | (cfg) -> nn.Module                   | (input_ids, x0) -> {name: tensor}, once  |
|                 |                         |                                      | per forward, handed to every attention  |
|                 |                         |                                      | as `extras` (e.g. value embeddings)     |
| attention       | model.attention = name  | (cfg, layer) -> nn.Module            | (x, extras) -> y, x normed (B, T, D)    |
| position        | model.position = name   | (cfg, head_dim) -> nn.Module         | (q, k) -> (q, k), (B, heads, T, head),  |
|                 |                         |                                      | after QK norm; called by the attention  |
| mlp             | model.mlp = name        | (cfg, layer) -> nn.Module            | (x) -> y, x normed (B, T, D)            |
| layout          | model.layout = name     | (cfg) -> layout.BlockSchedule        | (data: which blocks run, in what order) |

Every module tags each parameter it creates with a role (pgolf.model.roles.tag); the contract
test (tests/model/test_registry.py) builds every entry and checks roles, forward and backward.

Registration is a static import on purpose: the submission bundler ships the modules that
import statements reach, so an entry registered through importlib would be missing from
train_gpt.py. A module holding entries must be imported by pgolf.model.gpt (directly, or
through a module it imports).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn


class Registry(dict):
    """One slot: name -> builder. `component` is the planner component of the matrices the
    slot's modules own (pgolf.model.roles.component_of)."""

    def __init__(self, slot: str, key: str, component: str | None, many: bool = False, auto: bool = False):
        super().__init__()
        self.slot, self.key, self.component, self.many = slot, key, component, many
        self.auto = auto  # the value "auto" is accepted: the entry follows from other keys

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: `@MLPS.register("relu2")` above a builder (a class or a function)."""
        def add(builder: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.slot} '{name}' is registered twice ({self[name]!r} and {builder!r})")
            self[name] = builder
            return builder
        return add

    def build(self, name: str, *args: Any) -> Any:
        if name not in self:
            raise ValueError(self._unknown(name))
        built = self[name](*args)
        if isinstance(built, nn.Module) and self.component is not None:
            built.component = self.component  # where the planner counts its matrices
        return built

    def _unknown(self, name: Any) -> str:
        options = ", ".join([*self, *(["auto"] if self.auto else [])]) or "none registered"
        if self.many:
            return f"{self.key}: unknown {self.slot.replace('_', ' ')} '{name}' (options: {options})"
        return f"{self.key} must be one of {options}, got '{name}'"

    def problems(self, value: Any) -> list[str]:
        """What is wrong with the config value choosing this slot's entries (names unknown)."""
        if not self.many:
            return [] if value in self or (self.auto and value == "auto") else [self._unknown(value)]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return [f"{self.key} must be a list of names, e.g. {self.key}=[] (options: {', '.join(self) or 'none'})"]
        problems = [self._unknown(v) for v in value if v not in self]
        problems += [f"{self.key} lists '{v}' twice" for v in sorted(set(value)) if list(value).count(v) > 1]
        return problems


EMBEDDING_ADDONS = Registry("embedding_addon", "model.embed", "embedding", many=True)
POST_NORM_ADDONS = Registry("post_norm_addon", "model.post_norm", "embedding", many=True)
STREAM_ADDONS = Registry("stream_addon", "model.stream", "embedding", many=True)
ATTENTIONS = Registry("attention", "model.attention", "attention")
POSITIONS = Registry("position", "model.position", "attention")
MLPS = Registry("mlp", "model.mlp", "mlp")
LAYOUTS = Registry("layout", "model.layout", None, auto=True)

# Config field -> its slot, in the order the skeleton uses them.
SLOTS: dict[str, Registry] = {"embed": EMBEDDING_ADDONS, "post_norm": POST_NORM_ADDONS, "stream": STREAM_ADDONS,
                              "attention": ATTENTIONS, "position": POSITIONS, "mlp": MLPS, "layout": LAYOUTS}
