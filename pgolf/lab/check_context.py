"""What `pgolf check` reads from a run directory, once, and what its checks share: the options,
the evaluation modes the run was scored with, and RunContext (config, summary, log, receipts,
and on first use the tokenizer, shards and the model reloaded from the artifact)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from pgolf.config import Config, config_from_dict
from pgolf.lab.evaluations import ROUNDTRIP, counted_evaluations
from pgolf.runs import RunDir, read_json


class Skip(Exception):
    """What a check needs is not there: its row is SKIP with this reason."""


@dataclass
class CheckOptions:
    device: str = "cpu"
    windows: int = 3  # evaluation windows per causal / normalization probe
    seed: int = 0  # the probes' sampling seed
    data_dir: str | None = None  # the shards (val, train) and tokenizer folder instead of the run's
    runs_dir: str = "runs"  # a records folder's seed runs are looked up here
    skip: tuple[str, ...] = ()
    model: Any = None  # the model to probe instead of the artifact's (tests: a deliberately broken one)
    ttt_runner: Callable | None = None  # TTT to probe instead of pgolf.eval.ttt.run_ttt
    bundle: bytes | None = None  # train_gpt.py as it would ship (pgolf submit passes its own)


@dataclass
class Mode:
    """An evaluation the run was scored with, as C1 probes it."""

    kind: str  # standard | sliding | ttt
    seq_len: int
    stride: int
    ttt: dict | None = None  # the TTT receipt's settings
    source: str = ""

    @property
    def label(self) -> str:
        if self.kind == "ttt":
            return f"TTT, seq_len {self.seq_len}, stride {self.stride}"
        return f"{self.kind}, seq_len {self.seq_len}" + (f", stride {self.stride}" if self.kind == "sliding" else "")


class RunContext:
    """One run directory, its files read once and what the checks share, loaded on first use."""

    def __init__(self, run_dir: str | Path, opts: CheckOptions):
        from pgolf.eval.run import use_data_dir

        self.dir, self.rd, self.opts = Path(run_dir), RunDir(run_dir), opts
        saved = read_json(self.rd.config)
        self.config_dict: dict = saved["config"]
        self.cfg: Config = use_data_dir(config_from_dict(self.config_dict), opts.data_dir)
        if opts.data_dir:
            models = sorted(Path(opts.data_dir).glob("*.model"))
            if len(models) == 1:
                self.cfg.data.tokenizer_path = str(models[0])
        self.summary: dict = self.rd.read_summary()
        self.log = self.rd.log.read_text(encoding="utf-8", errors="replace") if self.rd.log.exists() else ""
        self.receipts: dict[str, dict] = {}
        for path in sorted(self.rd.receipts.glob("*.json")) if self.rd.receipts.is_dir() else []:
            try:
                self.receipts[path.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.receipts[path.name] = {}  # C3's audit names the problem

    @property
    def finished(self) -> bool:
        return self.summary.get("status") in ("done", "over_cap")

    @cached_property
    def tokenizer(self):
        from pgolf.data.tokenizer import TokenizerError, load_tokenizer

        try:
            return load_tokenizer(self.cfg.data.tokenizer_path)
        except (TokenizerError, OSError, ImportError) as exc:
            raise Skip(f"the tokenizer cannot be loaded here ({exc}); pass --data DIR") from None

    def _shards(self, pattern: str, split: str) -> list[Path]:
        from pgolf.data.shards import resolve_shards

        try:
            return resolve_shards(pattern)
        except FileNotFoundError:
            raise Skip(f"no {split} shards match {pattern} on this machine (run pgolf check where the run was "
                       "trained, or pass --data DIR)") from None

    @cached_property
    def val_files(self) -> list[Path]:
        # Byte sidecars (X_val_bytes_N.bin) match the validation pattern too: they hold counts, not tokens.
        return [p for p in self._shards(self.cfg.val_files(), "validation") if "_val_bytes_" not in p.name]

    @cached_property
    def train_files(self) -> list[Path]:
        return self._shards(self.cfg.train_files(), "training")

    @cached_property
    def val_tokens(self):
        """The whole validation stream (uint16 numpy), every shard in order, as `pgolf eval` reads it."""
        import numpy as np

        from pgolf.data.shards import read_shard

        return np.concatenate([read_shard(f) for f in self.val_files])

    def val_prefix(self, seq_len: int):
        """A prefix of the stream for the probes (int64 torch): enough for windows far from the start."""
        import torch

        n = min(len(self.val_tokens), max(64 * seq_len, 65_536) + 1)
        return torch.from_numpy(self.val_tokens[:n].astype("int64"))

    @property
    def bos_id(self) -> int | None:
        try:
            return int(self.tokenizer.bos_id)
        except Skip:
            return None

    @cached_property
    def device(self):
        import torch

        return torch.device(self.opts.device)

    @cached_property
    def model(self):
        if self.opts.model is not None:
            return self.opts.model
        from pgolf.eval.run import load_target
        from pgolf.model.gpt import build_model

        if not self.rd.artifact.exists():
            raise Skip(f"no artifact {RunDir.ARTIFACT}: the run did not finish")
        cfg, state, _, _ = load_target(str(self.dir), live=False)
        model = build_model(cfg.model, self.device)
        model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)
        return model

    @property
    def scored_targets(self) -> int | None:
        scored = self.summary.get("val_tokens_scored")
        if scored is None and ROUNDTRIP in self.receipts:
            scored = self.receipts[ROUNDTRIP].get("total_targets")
        return scored

    @cached_property
    def counted(self):
        return counted_evaluations(self.receipts, self.scored_targets)

    @cached_property
    def modes(self) -> list[Mode]:
        """The evaluations the run was scored with: each standard / sliding setting in its receipts,
        and its TTT (the counted one, else the latest); with no receipts, the run's own protocol."""
        modes: dict[tuple, Mode] = {}
        ordered = sorted(self.receipts.items(), key=lambda kv: kv[0] != ROUNDTRIP)
        for name, data in ordered:
            s = data.get("settings") or {}
            if data.get("kind") in ("standard", "sliding") and "seq_len" in s:
                key = (data["kind"], s["seq_len"], s["stride"])
                modes.setdefault(key, Mode(data["kind"], int(s["seq_len"]), int(s["stride"]), source=name))
        ttt = self.counted.get("ttt")
        latest = [(n, d) for n, d in sorted(self.receipts.items()) if d.get("kind") == "ttt"]
        if ttt is not None or latest:
            name, data = (ttt.name, ttt.data) if ttt is not None else latest[-1]
            s = data.get("settings") or {}
            if "seq_len" in s:
                modes[("ttt",)] = Mode("ttt", int(s["seq_len"]), int(s["stride"]), s, name)
        if not modes:
            seq_len = self.cfg.train.train_seq_len
            stride = min(self.cfg.train.eval_stride or seq_len, seq_len)
            kind = "standard" if stride == seq_len else "sliding"
            modes[(kind,)] = Mode(kind, seq_len, stride, source="the run's config (it has no receipts)")
        return list(modes.values())
