"""Trained-like weights for the planner's artifact estimate.

A compressed artifact's size depends on the values it stores, so the planner quantizes and
compresses weights that look like trained ones instead of counting parameters. Each tensor
is drawn as

    trained = initial x decay + drift,   drift = scale x u x S^power x Z

* ``initial``: the model's real initialisation (built with the run's seed), so what a short run
  barely moves (the uniform-init matrices) keeps its shape, and zero-initialised projections
  start at zero (every row drifts alike: embedding rows of tokens a corpus never uses, which
  stay put in training, make the estimate a little high, +2% on the synthetic smoke run);
* ``u``: the RMS of one optimizer update of that tensor at the base learning rate, taken from
  the optimizer groups training builds (``pgolf.train.optim.build_optimizers``): Muon's
  orthogonalised step ``lr * sqrt(max(1, rows/cols)) / sqrt(max(rows, cols))``, Adam's ``lr``;
* ``S``: the learning-rate-weighted step count (the sum of ``pgolf.train.lr.lr_scale`` over the
  planned steps); with decoupled weight decay older steps are forgotten (each step multiplies
  what came before by ``1 - lr * wd``, as it does the initial values: ``decay``);
* ``Z``: per element, zero mean, unit variance, with the per-row kurtosis of real drifts
  (a power of a normal draw; 3 = Gaussian);
* ``scale``, ``power``, ``kurtosis`` per optimizer kind (``DriftLaw``): fitted on CPU runs of
  the baseline architecture on the FineWeb sample (see ``DEFAULT_LAWS``), or measured from a
  real run's checkpoint by ``laws_from_run`` (``pgolf plan --from RUN``), the most accurate.

The absolute scale matters: the official int8 export floors each row's scale at 1/127, so rows
whose largest weight is below 1 use fewer codes and compress better (a short run's baseline
is several MB smaller than a trained one). Per-row intN with clip search is scale-free, and
there only the shape (init/drift mix, kurtosis) matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pgolf.config import Config, config_from_dict
from pgolf.model.gpt import GPT
from pgolf.model.roles import ROLE_TABLE, role_of
from pgolf.runs import RunDir, find_run_dir, latest_checkpoint, read_json
from pgolf.train.lr import lr_scale
from pgolf.train.optim import build_optimizers

SEED = 0  # the draw is deterministic: the same config plans to the same bytes


@dataclass(frozen=True)
class DriftLaw:
    """RMS of (trained - initial) / u = scale x S^power; Z's per-row kurtosis."""

    scale: float
    power: float
    kurtosis: float = 3.0

    def to_dict(self) -> dict:
        return {"scale": self.scale, "power": self.power, "kurtosis": self.kurtosis}


# Fitted on CPU runs of the baseline architecture (relu^2, tied embedding, default optimizer
# settings) on the FineWeb sample: width 128 x 4 layers checkpointed every 25 steps up to 375
# (drift / u: Muon 10.3 at 25 steps, 24.1 at 100, 59.3 at 375; Adam on the embedding 3.9, 7.4,
# 14.7; per-row kurtosis of Muon drifts 3.1-3.6), checked on width 256 (120 steps) and a
# synthetic-data run. Muon's growth steepens with steps (local power 0.6 -> 0.78), so beyond a
# few hundred steps this law is a lower bound; at the official baseline's ~13,800 steps it
# already puts rows' largest weights above 1, where int8 sizes stop depending on the scale, and
# the estimate (15.6 MB int8 + zlib, pgolf's container) sits next to the official 15.8 MB.
DEFAULT_LAWS: dict[str, DriftLaw] = {
    "muon": DriftLaw(scale=1.18, power=0.66, kurtosis=3.3),
    "adam": DriftLaw(scale=0.81, power=0.49, kurtosis=3.0),  # embeddings, an untied head
    "control": DriftLaw(scale=1.9, power=0.45, kurtosis=3.0),  # gains, mixes, skip weights (fp32)
}


# How each optimizer moves what it trains: the DriftLaw kind of its parameters.
DRIFT_KIND = {"muon": "muon", "adam_token": "adam", "adam_head": "adam", "adam_scalar": "control"}


@dataclass(frozen=True)
class TensorRole:
    """How training moves one parameter: its optimizer kind, update RMS u and decay rate."""

    kind: str  # "muon" | "adam" | "control" (Adam on control scalars)
    update_rms: float
    lr: float
    weight_decay: float


def tensor_roles(model: nn.Module, cfg: Config) -> dict[str, TensorRole]:
    """Every trained parameter's optimizer kind and one-step update RMS, from the optimizer
    groups training itself builds (so new parameter kinds are planned as they are trained)."""
    opts = build_optimizers(model, cfg.optim, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    roles: dict[str, TensorRole] = {}
    for opt in opts.all():
        for group in opt.param_groups:
            lr, wd = float(group["base_lr"]), float(group.get("weight_decay", 0.0) or 0.0)
            for p in group["params"]:
                name = names[id(p)]
                kind = DRIFT_KIND[ROLE_TABLE[role_of(model, name)].optimizer]
                roles[name] = TensorRole(kind, _update_rms(kind, p, lr), lr, wd)
    return roles


def _update_rms(kind: str, p: Tensor, lr: float) -> float:
    if kind != "muon":
        return lr
    rows, cols = p.shape[0], p.numel() // max(p.shape[0], 1)
    return lr * math.sqrt(max(1.0, rows / cols)) / math.sqrt(max(rows, cols))


def effective_steps(cfg: Config, steps: int, decay_rate: float = 0.0) -> tuple[float, float]:
    """(S, decay): the lr-weighted step count of `steps` training steps under the configured
    schedule, each earlier step shrunk by (1 - lr_t * decay_rate) per later step, and the
    factor the initial values were shrunk by. Wall-clock schedules assume even step times."""
    t = cfg.train
    step_ms = 1000.0 * t.max_wallclock_seconds / max(steps, 1) if t.max_wallclock_seconds > 0 else 0.0
    s_eff, decay = 0.0, 1.0
    for step in range(steps):
        scale = lr_scale(step, step * step_ms, t)
        shrink = 1.0 - scale * decay_rate
        s_eff = s_eff * shrink + scale
        decay *= shrink
    return s_eff, decay


def _abs_moment(r: float) -> float:
    """E|N|^r of a standard normal N."""
    return math.exp(r / 2 * math.log(2) + math.lgamma((r + 1) / 2)) / math.sqrt(math.pi)


def _power_for(kurtosis: float) -> float:
    """The a for which sign(N) |N|^a has the given kurtosis (a = 1: Gaussian, 3), by bisection."""
    lo, hi = 0.3, 3.0
    for _ in range(60):
        a = (lo + hi) / 2
        if _abs_moment(4 * a) / _abs_moment(2 * a) ** 2 < kurtosis:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def standard_draw(shape: tuple[int, ...], kurtosis: float, gen: torch.Generator) -> Tensor:
    """Zero mean, unit variance, the given kurtosis: sign(N) |N|^a / sqrt(E|N|^2a), one normal
    draw per element (a > 1 gives heavier tails than Gaussian, a < 1 lighter)."""
    z = torch.randn(shape, generator=gen)
    if abs(kurtosis - 3.0) > 1e-6:
        a = _power_for(kurtosis)
        z = z.sign().mul_(z.abs().pow_(a)).div_(math.sqrt(_abs_moment(2 * a)))
    return z


def draw_trained_state(model: nn.Module, cfg: Config, steps: int,
                       laws: dict[str, DriftLaw] | None = None) -> dict[str, Tensor]:
    """Fill `model`'s parameters (holding its initialisation) with trained-like values for
    `steps` training steps, in place; returns its state dict. Buffers are left alone."""
    laws = laws or DEFAULT_LAWS
    roles = tensor_roles(model, cfg)
    gen = torch.Generator().manual_seed(SEED)
    schedules: dict[float, tuple[float, float]] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles.get(name)
            if role is None:  # not trained: stays at its initial value
                continue
            rate = role.lr * role.weight_decay
            if rate not in schedules:
                schedules[rate] = effective_steps(cfg, steps, rate)
            s_eff, decay = schedules[rate]
            law = laws[role.kind]
            std = law.scale * role.update_rms * s_eff ** law.power if s_eff > 0 else 0.0
            drift = standard_draw(tuple(p.shape), law.kurtosis, gen).mul_(std)
            p.mul_(decay).add_(drift.to(p.dtype))
    return model.state_dict()


def _row_kurtosis(x: Tensor) -> float:
    rows = x.reshape(x.shape[0], -1).double()
    rows = rows - rows.mean(dim=1, keepdim=True)
    var = rows.pow(2).mean(dim=1)
    keep = var > 0
    if not keep.any():
        return 3.0
    return float((rows[keep].pow(4).mean(dim=1) / var[keep].pow(2)).mean())


def laws_from_run(run_dir: str | Path) -> tuple[dict[str, DriftLaw], dict]:
    """Drift laws measured on a finished run: its latest checkpoint minus its initialisation
    (rebuilt from its saved config and seed), per optimizer kind; the power is kept from
    DEFAULT_LAWS (one run shows one step count), the scale and kurtosis are the run's.
    Returns the laws and what they were measured on."""
    run = find_run_dir(str(run_dir))
    cfg = config_from_dict(read_json(RunDir(run).config)["config"])
    ckpt_path = latest_checkpoint(RunDir(run).checkpoints)
    if ckpt_path is None:
        raise ValueError(f"--from {run}: no checkpoint in {run / 'checkpoints'} to measure weights on")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    trained, steps = ckpt["model"], int(ckpt["step"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model)
    init = model.state_dict()
    if set(init) != set(trained):
        raise ValueError(f"--from {run}: its checkpoint does not match its config's model (different parameter "
                         "names); was it trained by another pgolf version?")
    roles = tensor_roles(model, cfg)
    ratios: dict[str, list[float]] = {}
    kurts: dict[str, list[float]] = {}
    for name, role in roles.items():
        law = DEFAULT_LAWS[role.kind]
        s_eff, decay = effective_steps(cfg, steps, role.lr * role.weight_decay)
        drift = trained[name].float() - init[name].float() * decay
        expected = role.update_rms * s_eff ** law.power
        if expected <= 0:
            continue
        ratios.setdefault(role.kind, []).append(float(drift.pow(2).mean().sqrt()) / expected)
        if drift.ndim >= 2 and role.kind != "control":  # controls are few, 1-D and stored as fp32
            kurts.setdefault(role.kind, []).append(_row_kurtosis(drift))
    laws = dict(DEFAULT_LAWS)
    for kind, values in ratios.items():
        kurtosis = sum(kurts[kind]) / len(kurts[kind]) if kurts.get(kind) else laws[kind].kurtosis
        laws[kind] = DriftLaw(sum(values) / len(values), laws[kind].power, round(kurtosis, 3))
    return laws, {"run": str(run), "checkpoint": ckpt_path.name, "step": steps}
