"""Block layouts: which of GPT.blocks run, in what order, and which outputs skip ahead.

A layout is data (a BlockSchedule), so a new arrangement is one builder here and the model's
forward never changes."""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.model.config import ModelConfig
from pgolf.model.registry import LAYOUTS


@dataclass(frozen=True)
class BlockSchedule:
    """The order GPT runs its blocks in, as indices into GPT.blocks.

    plain: run first, without skips (recurrence passes 1..K-1); encoder: each output is kept
    for a skip; middle: no skips (the repeated core); decoder: each block first adds, while
    any remain, the latest kept output (last in, first out) times its skip weight. unlooped: the
    schedule GPT runs instead while its `looping` flag is off (layout loop's early phase)."""

    plain: tuple[int, ...]
    encoder: tuple[int, ...]
    middle: tuple[int, ...]
    decoder: tuple[int, ...]
    unlooped: "BlockSchedule | None" = None

    @property
    def num_skips(self) -> int:
        return min(len(self.encoder), len(self.decoder))

    @property
    def effective_depth(self) -> int:
        return len(self.plain) + len(self.encoder) + len(self.middle) + len(self.decoder)


@LAYOUTS.register("unet")
def unet(cfg: ModelConfig) -> BlockSchedule:
    """The official baseline: first half encoder, the rest decoder, each block once."""
    n, half = cfg.num_layers, cfg.num_layers // 2
    return BlockSchedule((), tuple(range(half)), (), tuple(range(half, n)))


@LAYOUTS.register("recurrence")
def recurrence(cfg: ModelConfig) -> BlockSchedule:
    """model.recurrence - 1 plain passes over every block, then the U-Net: depth for free in
    parameters (the skips only on the last pass, where they were trained to connect)."""
    flat = unet(cfg)
    return BlockSchedule(tuple(range(cfg.num_layers)) * (cfg.recurrence - 1), flat.encoder, (), flat.decoder)


@LAYOUTS.register("middle_cycle")
def middle_cycle(cfg: ModelConfig) -> BlockSchedule:
    """Stem (encoder), core x repeats (middle, no skips), tail (decoder; skips from the stem)."""
    stem, core = cfg.cycle_stem, cfg.cycle_core
    return BlockSchedule((), tuple(range(stem)), tuple(range(stem, stem + core)) * cfg.cycle_repeats,
                         tuple(range(stem + core, cfg.num_layers)))


@LAYOUTS.register("loop")
def loop(cfg: ModelConfig) -> BlockSchedule:
    """#1855's depth recurrence: blocks loop_start..loop_end run loop_passes times in a row
    (11 blocks, 3..5 x 3: 0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10); the first half of the 17 applications
    is the encoder, the rest the decoder. Unlooped, the plain U-Net over the blocks."""
    order = [*range(cfg.loop_start), *list(range(cfg.loop_start, cfg.loop_end + 1)) * cfg.loop_passes,
             *range(cfg.loop_end + 1, cfg.num_layers)]
    half = len(order) // 2
    return BlockSchedule((), tuple(order[:half]), (), tuple(order[half:]), unet(cfg))


def cycle_enabled(cfg: ModelConfig) -> bool:
    return any((cfg.cycle_stem, cfg.cycle_core, cfg.cycle_repeats, cfg.cycle_tail))


def layout_name(cfg: ModelConfig) -> str:
    """model.layout, or for "auto" (the default) the layout the older keys describe: the middle
    cycle when any cycle_* key is set, recurrence when model.recurrence > 1, else the U-Net."""
    if cfg.layout != "auto":
        return cfg.layout
    if cycle_enabled(cfg):
        return "middle_cycle"
    return "recurrence" if cfg.recurrence > 1 else "unet"


def block_schedule(cfg: ModelConfig) -> BlockSchedule:
    return LAYOUTS.build(layout_name(cfg), cfg)


def layout_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the layout keys of cfg (cfg.layout is a registered name or auto)."""
    problems = []
    name = layout_name(cfg)
    if cfg.recurrence < 1:
        problems.append(f"model.recurrence must be >= 1 (1: every block runs once), got {cfg.recurrence}")
    if cfg.layout == "unet" and (cfg.recurrence != 1 or cycle_enabled(cfg)):
        problems.append("model.layout=unet runs every block once: set model.recurrence=1 and the cycle_* keys "
                        "to 0, or model.layout=auto")
    if cfg.layout == "recurrence" and cycle_enabled(cfg):
        problems.append("model.layout=recurrence ignores the middle cycle: set the cycle_* keys to 0, "
                        "or model.layout=auto")
    if name == "middle_cycle":
        parts = (cfg.cycle_stem, cfg.cycle_core, cfg.cycle_repeats, cfg.cycle_tail)
        if cfg.recurrence != 1:
            problems.append("model.recurrence and the middle cycle (model.cycle_*) exclude each other: "
                            "set model.recurrence=1 or the cycle_* keys to 0")
        if min(parts) < 0 or cfg.cycle_core < 1 or cfg.cycle_repeats < 1:
            problems.append("the middle cycle needs model.cycle_core >= 1 and model.cycle_repeats >= 1 "
                            "(model.cycle_stem, model.cycle_tail >= 0)")
        elif cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail != cfg.num_layers:
            problems.append(f"model.num_layers={cfg.num_layers} must equal model.cycle_stem + model.cycle_core + "
                            f"model.cycle_tail = {cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail} (the unique "
                            f"blocks); set model.num_layers={cfg.cycle_stem + cfg.cycle_core + cfg.cycle_tail}")
    defaults = ModelConfig()
    loop_keys = ("loop_start", "loop_end", "loop_passes", "loop_start_frac")
    if name != "loop":
        problems += [f"model.{key} applies only with model.layout=loop: set model.layout=loop, or leave model.{key} "
                     f"at its default" for key in loop_keys if getattr(cfg, key) != getattr(defaults, key)]
    elif cfg.recurrence != 1 or cycle_enabled(cfg):
        problems.append("model.layout=loop excludes model.recurrence and the middle cycle: set model.recurrence=1 "
                        "and the cycle_* keys to 0")
    elif not 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers or cfg.loop_passes < 2:
        problems.append(f"model.layout=loop needs 0 <= model.loop_start <= model.loop_end < model.num_layers="
                        f"{cfg.num_layers} and model.loop_passes >= 2 (e.g. 3, 5, 3), got {cfg.loop_start}, "
                        f"{cfg.loop_end}, {cfg.loop_passes}")
    return problems
