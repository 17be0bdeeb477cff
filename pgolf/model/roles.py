"""Parameter roles: one declaration of how every parameter is trained, cast and exported.

Each module declares the role of the parameters it creates, right where it creates them:

    self.q_gain = nn.Parameter(torch.full((heads,), gain))
    tag(self, Role.CONTROL, "q_gain")

and `param_roles(model)` reads every parameter's role back by its state-dict name, refusing a
model with any untagged parameter (naming it). ROLE_TABLE below is the only place that says
what a role means; the optimizer groups (pgolf.train.optim), build_model's CUDA casting, the
planner and the export read it instead of matching name substrings.

Why the role lives on the owning module and not on the tensor: a tensor attribute is lost
whenever torch replaces a Parameter object (copy.deepcopy, Module.to_empty, swapped module
conversions), while a module's own attributes survive all of them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn


class Role(enum.Enum):
    MATRIX = "matrix"  # a 2-D weight multiplying activations (the blocks' linears)
    EMBEDDING = "embedding"  # a lookup table indexed by token ids (the tied input/output embedding)
    HEAD = "head"  # an untied output projection to the vocabulary
    CONTROL = "control"  # a small gain / mix / skip weight, kept in fp32 end to end
    GATE = "gate"  # a small learned gate of a technique; like CONTROL but exported as fp16
    # A small matrix of an add-on (the projection of a bigram or value-embedding table): Adam at
    # the scalar lr, as the records train them, and exported by the scheme (fp16 while small).
    SIDE_MATRIX = "side_matrix"


@dataclass(frozen=True)
class RoleTreatment:
    """What one role means, from training to the artifact."""

    optimizer: str  # the Optimizers field (pgolf.train.optim) that trains it
    lr_key: str  # the optim.* learning rate
    wd_key: str  # the optim.* weight decay
    cuda_dtype: torch.dtype  # the dtype build_model gives it on CUDA (the rest of the body is bf16)
    # "scheme": quantized by export.scheme / policy; "int8": the same, but int8 under a narrower
    # scheme unless the policy says otherwise (as the records keep embeddings); "fp32" | "fp16": kept as float
    export: str
    qat: bool  # may quantization-aware training fake-quantize it
    component: str | None  # the planner's component; None: the slot owning it (attention, mlp, ...)
    tied_lr_key: str | None = None  # the learning rate instead, when the embeddings are tied


ROLE_TABLE: dict[Role, RoleTreatment] = {
    # Muon orthogonalises whole matrices; fp32 master weights, cast to the input dtype per use.
    Role.MATRIX: RoleTreatment("muon", "matrix_lr", "muon_wd", torch.float32, "scheme", True, None),
    # Sparse rows: Adam. bf16 on CUDA, as the official baseline; tied, it is the head too.
    Role.EMBEDDING: RoleTreatment("adam_token", "embed_lr", "embed_wd", torch.bfloat16, "int8", False, "embedding",
                                  tied_lr_key="tied_embed_lr"),
    Role.HEAD: RoleTreatment("adam_head", "head_lr", "adam_wd", torch.float32, "int8", False, "embedding"),
    # Few numbers with a large effect on the function: full precision everywhere.
    Role.CONTROL: RoleTreatment("adam_scalar", "scalar_lr", "adam_wd", torch.float32, "fp32", False, "control"),
    Role.GATE: RoleTreatment("adam_scalar", "scalar_lr", "adam_wd", torch.float32, "fp16", False, "control"),
    Role.SIDE_MATRIX: RoleTreatment("adam_scalar", "scalar_lr", "adam_wd", torch.float32, "scheme", False, "embedding"),
}

ROLES_ATTR = "_param_roles"  # {parameter's own name: Role} on the module that owns it


class UntaggedParameterError(ValueError):
    """A parameter no module gave a role: its treatment would be a guess."""


def tag(module: nn.Module, role: Role, *names: str) -> None:
    """Declare that `module`'s own parameters `names` (direct attributes) have `role`."""
    own = module.__dict__.setdefault(ROLES_ATTR, {})
    for name in names:
        if not isinstance(module._parameters.get(name), nn.Parameter):
            raise ValueError(f"tag: {type(module).__name__} has no parameter '{name}' of its own to give a role")
        own[name] = role


def param_roles(model: nn.Module) -> dict[str, Role]:
    """{name: role} for every parameter, in model.named_parameters() order and naming (a shared
    parameter once, under its first name). Raises UntaggedParameterError naming any without one."""
    roles: dict[str, Role] = {}
    missing: list[str] = []
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        own = module.__dict__.get(ROLES_ATTR, {})
        for leaf, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{prefix}.{leaf}" if prefix else leaf
            if leaf in own:
                roles[name] = own[leaf]
            else:
                missing.append(name)
    if missing:
        raise UntaggedParameterError(
            f"parameters without a role: {', '.join(missing)}; the module creating each must call "
            f"pgolf.model.roles.tag(module, Role.<ROLE>, name) (roles: {', '.join(r.name for r in Role)})")
    return roles


def role_of(model: nn.Module, name: str) -> Role:
    """The role of one parameter, by its name in `model`."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    role = module.__dict__.get(ROLES_ATTR, {}).get(leaf)
    if role is None:
        raise UntaggedParameterError(f"parameter '{name}' has no role (see pgolf.model.roles.tag)")
    return role


def treatment_of(model: nn.Module, name: str) -> RoleTreatment:
    return ROLE_TABLE[role_of(model, name)]


def lr_key(role: Role, tied_embeddings: bool) -> str:
    """The optim.* key of the role's learning rate."""
    t = ROLE_TABLE[role]
    return t.tied_lr_key if tied_embeddings and t.tied_lr_key else t.lr_key


def component_of(model: nn.Module, name: str) -> str:
    """The planner component of a parameter: its role's, or for matrices the slot of the
    innermost registry-built module owning it (pgolf.model.registry sets `component`); 'other'
    when none does."""
    fixed = treatment_of(model, name).component
    if fixed is not None:
        return fixed
    found, module = "other", model
    for part in name.split(".")[:-1]:
        module = getattr(module, part)
        found = getattr(module, "component", found)
    return found


# ------------------------------------------------------------------ for the export and QAT

def export_treatment(model: nn.Module) -> dict[str, str]:
    """{parameter name: "scheme" | "int8" | "fp32" | "fp16"}: how the export stores each parameter by
    its role. "scheme": export.scheme / policy decide; "int8": the same, except that a scheme narrower
    than int8 leaves it int8 (embedding tables, an untied head); the floats: kept as that float whatever the
    scheme (CONTROL fp32, GATE fp16). The export's small-tensor rule (KEEP_FLOAT_MAX_NUMEL)
    stores every other small float tensor as fp16."""
    return {name: ROLE_TABLE[role].export for name, role in param_roles(model).items()}


def export_passthrough(model: nn.Module) -> dict[str, str]:
    """{name: "fp32" | "fp16"}: the parameters the export keeps as floats whatever its scheme."""
    return {name: kind for name, kind in export_treatment(model).items() if kind in ("fp32", "fp16")}


def qat_eligible_names(model: nn.Module) -> frozenset[str]:
    """The parameters quantization-aware training may fake-quantize (qat.pattern narrows them)."""
    return frozenset(n for n, role in param_roles(model).items() if ROLE_TABLE[role].qat)
