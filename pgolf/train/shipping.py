"""What a shipped train_gpt.py carries: its name, the keys its runner may set, the modules it holds
only when the run's config needs them, and how its bytes are described. Torch-free: the bundler,
the bundle's main and the export all read it.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from pgolf.config import Config
from pgolf.train.callbacks import CALLBACKS

BUNDLE_NAME = "train_gpt.py"
# Keys that identify one run rather than the recipe: the seed (SEED picks it), where runs are
# written and how they are named or grouped. A bundle's CONFIG leaves them out.
RUN_IDENTITY_KEYS = ("train.seed", "run.run_id", "run.runs_dir", "run.group")
# What the runner of a shipped train_gpt.py may set (arguments, or SEED, RUN_ID, DATA_PATH,
# TOKENIZER_PATH): the run's identity and where its data is. Every other key is the recipe the
# file was packed and counted for, checked when its run was configured (pgolf.config.checks,
# which a bundle does not carry).
RUNNER_KEYS = (*RUN_IDENTITY_KEYS, "data.data_path", "data.tokenizer_path", "data.train_pattern", "data.val_pattern")
# Every module that pgolf imports only inside functions, with the configs that need it: it is
# bundled when its predicate holds for the run's config. A lazy import of a module that is
# neither here nor imported at module level wherever its importer is (bundle.ROOT_MODULES) is
# bundled always, and tests/train/test_bundle.py fails until it is classified here.
OPTIONAL_MODULES: dict[str, Callable[[Config], bool]] = {
    "pgolf.data.synthetic": lambda cfg: cfg.data.source == "synthetic",
    "pgolf.compress.gptq": lambda cfg: cfg.export.gptq or cfg.export.allocate,  # allocation needs its Hessians
    "pgolf.compress.allocate": lambda cfg: cfg.export.allocate,
    "pgolf.compress.grouping": lambda cfg: cfg.export.layout == "per_group",  # writes and reads such artifacts
    "pgolf.compress.lqer": lambda cfg: cfg.export.lqer_rank > 0,  # the export's; a reload needs only quant
    "pgolf.train.calibration": lambda cfg: cfg.export.gptq or cfg.export.allocate,
    "pgolf.train.losses": lambda cfg: cfg.train.fused_loss != "off",  # auto: on for CUDA
    "pgolf.train.parallel_muon": lambda cfg: cfg.optim.parallel_muon != "off",  # auto: on for CUDA, world size > 1
    "pgolf.train.clipping": lambda cfg: cfg.train.grad_clip_norm > 0 and (
        cfg.train.grad_clip_mode == "per_rank" or cfg.optim.parallel_muon != "off"),
    **dict(CALLBACKS.values()),  # a training callback's module, when its section switches it on
    "pgolf.train.bundle": lambda cfg: False,  # packing; inside a bundle the running file is what counts
}


def describe_code(bundle: bytes, where: str) -> str:
    """How code bytes were counted; submit reads the sha256 back to check the code is unchanged."""
    return f"{where}; sha256:{hashlib.sha256(bundle).hexdigest()[:16]}"

