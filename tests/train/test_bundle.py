"""The single-file train_gpt.py: what it holds, that its length is the counted code bytes, and
that it trains exactly as pgolf does with no pgolf on the path."""

import ast
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pgolf
import pgolf.train.bundle as bundle_module
import pgolf.compress.container as container_module
from pgolf.compress.container import ArtifactError
from pgolf.train.export import counted_code_bytes
from pgolf.train.bundle import (LOADER_CALLS, MODULE_SEPARATOR, _module_path, bundle_config, bundle_modules,
                                build_bundle, compressor_of, shipped_sources, unclassified_lazy_imports)
from pgolf.train.entry import BUNDLE_EXIT_CODES, recipe_changes, run_bundled
from pgolf.train.minify import minify_source
from pgolf.train.shake import shake
from pgolf.rules import STATUS_EXIT_CODES
from pgolf.config import Config, config_from_dict
from pgolf.runs import read_json, read_metrics
from pgolf.train.run import run_training
from pgolf.config.resolve import resolve_config
from tests.train.test_train import tiny_config

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
PRESETS = Path(__file__).resolve().parents[2] / "configs"

PACKAGE = Path(pgolf.__file__).resolve().parent
COMPRESSORS = ["lzma"] + (["brotli"] if bundle_module.default_compressor() == "brotli" else [])


def packed_sources(bundle: bytes) -> dict[str, str]:
    blob = re.search(rb'^PACKED=b"([^"]*)"$', bundle, re.MULTILINE)[1]
    compressor = re.search(rb"^try:import (\w+) as z$", bundle, re.MULTILINE)[1].decode()
    parts = __import__(compressor).decompress(base64.b85decode(blob)).decode().split(MODULE_SEPARATOR)
    return dict(zip(parts[::2], parts[1::2]))


def minified(cfg: Config) -> dict[str, str]:
    return {name: minify_source(text, str(_module_path(name).relative_to(PACKAGE.parent)))
            for name, text in shipped_sources(cfg).items()}


def losses(run_dir: Path) -> list[float]:
    return [e["train_loss"] for e in read_metrics(run_dir) if e["event"] == "train"]


def sha(code_description: str) -> str:
    return re.search(r"sha256:(\w+)", code_description)[1]


def test_bundle_holds_the_minified_closure_of_training(tmp_path):
    cfg = tiny_config(tmp_path)
    sources = packed_sources(build_bundle(cfg))
    assert sources == minified(cfg)
    for name in ("pgolf", "pgolf.train.run", "pgolf.model.gpt", "pgolf.train.export", "pgolf.compress.quant",
                 "pgolf.data.synthetic", "pgolf.data.tokenizer", "pgolf.train.entry"):
        assert name in sources, name
    # Minified: no docstrings or comments, names kept.
    run = sources["pgolf.train.run"]
    assert '"""' not in run and "\n#" not in run and "def run_new(" in run
    # The lab's entry (resume, the run lock) is not what a bundle runs: shaken out with the lock.
    assert "def run_training(" not in run and "class RunLock" not in sources["pgolf.runs"]
    assert len(run) < 0.8 * len(_module_path("pgolf.train.run").read_text())
    # Tools that training never imports stay out: they are not counted. Nor is the bundler.
    for name in ("pgolf.cli", "pgolf.lab.submit", "pgolf.lab.ledger", "pgolf.data.fineweb", "pgolf.eval.run",
                 "pgolf.train.bundle", "pgolf.train.minify"):
        assert name not in sources, name


def test_optional_modules_follow_the_config(tmp_path):
    baseline = bundle_modules(Config())
    for name in ("pgolf.data.synthetic", "pgolf.compress.gptq", "pgolf.compress.allocate", "pgolf.train.bundle"):
        assert name not in baseline, name
    assert "pgolf.data.synthetic" in bundle_modules(tiny_config(tmp_path))
    gptq = bundle_modules(tiny_config(tmp_path, "export.gptq=true"))
    assert "pgolf.compress.gptq" in gptq and "pgolf.compress.allocate" not in gptq
    allocate = bundle_modules(tiny_config(tmp_path, "export.allocate=true"))
    assert {"pgolf.compress.gptq", "pgolf.compress.allocate"} <= set(allocate)
    assert bundle_modules(Config().to_dict()) == baseline == bundle_modules()


def test_every_lazy_pgolf_import_is_classified():
    """A pgolf import inside a function names a module that only some configs need: it must be in
    entry.OPTIONAL_MODULES, or imported at module level wherever its importer is bundled;
    otherwise a bundle could lack it. (bundle_modules ships such a module always meanwhile.)"""
    assert unclassified_lazy_imports() == []


def test_an_unclassified_lazy_import_is_named_and_still_bundled(monkeypatch):
    real_read = bundle_module._read

    def read_with_a_new_lazy_import(name):
        read = real_read(name)
        if name == "pgolf.train.lr":
            return read[0], read[1], read[2] | {"pgolf.lab.ledger"}
        return read

    monkeypatch.setattr(bundle_module, "_read", read_with_a_new_lazy_import)
    assert unclassified_lazy_imports() == ["pgolf.train.lr imports pgolf.lab.ledger inside a function"]
    assert "pgolf.lab.ledger" in bundle_modules(Config())


def test_imports_are_classified_by_where_they_run():
    source = ("import pgolf.a\nclass C:\n    from pgolf import b\ntry:\n    from .c import x\nexcept ImportError:\n"
              "    pass\ndef f():\n    from pgolf.d import y\n    g = lambda: __import__('os')\n")
    top, lazy = bundle_module._pgolf_imports(source, "pgolf.pkg.mod")
    assert {"pgolf.a", "pgolf", "pgolf.b", "pgolf.pkg.c", "pgolf.pkg.c.x"} == set(top)
    assert {"pgolf.d", "pgolf.d.y"} == set(lazy)


def test_pgolf_sources_import_statically():
    """The bundle finds modules by reading import statements; a computed import would be missed."""
    for name, text in bundle_modules().items():
        assert "import_module(" not in text and "__import__(" not in text, name


def test_bundle_is_deterministic_and_the_same_file_for_every_seed(tmp_path):
    one = build_bundle(tiny_config(tmp_path, "train.seed=1", "run.run_id=a", "run.group=g"))
    again = build_bundle(tiny_config(tmp_path, "train.seed=1", "run.run_id=a", "run.group=g"))
    other_seed = build_bundle(tiny_config(tmp_path, "train.seed=2", "run.run_id=b", "run.runs_dir=elsewhere"))
    assert one == again == other_seed
    changed = build_bundle(tiny_config(tmp_path, "model.mlp_mult=3"))
    assert changed != one and "'mlp_mult': 3" in changed.decode()
    bundle_module.minify_source.cache_clear()
    bundle_module._pack_text.cache_clear()
    assert build_bundle(tiny_config(tmp_path, "train.seed=1")) == one  # minify and pack afresh: same bytes


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_tracebacks_name_the_original_module(tmp_path, compressor):
    """The importer compiles each module under its package path inside the bundle and serves its
    (minified) source, so a traceback names pgolf/train/lr.py and shows the failing line."""
    bundle = tmp_path / "train_gpt.py"
    bundle.write_bytes(build_bundle(Config(), compressor=compressor))
    assert f"{compressor}-packed" in bundle.read_text().splitlines()[0]
    code = ("import runpy; runpy.run_path('train_gpt.py', run_name='bundle'); import pgolf.train.lr as lr; "
            "print(lr.__file__); lr.lr_scale(0, 0.0, None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
    module_file = str(bundle / "pgolf" / "train" / "lr.py")
    assert proc.stdout.strip() == module_file
    assert f'File "{module_file}", line' in proc.stderr and "in lr_scale" in proc.stderr, proc.stderr
    assert "AttributeError" in proc.stderr and "max_wallclock_seconds" in proc.stderr  # the source line shown


def test_counted_code_bytes_are_the_bundle_length(tmp_path):
    cfg = tiny_config(tmp_path)
    n, desc = counted_code_bytes(cfg)
    assert n == len(build_bundle(cfg)) == len(build_bundle(cfg.to_dict()))
    assert "train_gpt.py" in desc and re.search(r"sha256:[0-9a-f]{16}", desc)


def test_embedded_config_is_the_recipe_without_the_run_identity(tmp_path):
    cfg = tiny_config(tmp_path, "train.seed=5", "run.group=g", "run.run_id=x")
    recipe = bundle_config(cfg)
    assert recipe["model"]["num_layers"] == 3 and "seed" not in recipe.get("train", {})
    assert "run" not in recipe or not {"run_id", "group", "runs_dir"} & set(recipe["run"])
    assert recipe["model"]["num_heads"] == 2 and recipe["data"]["source"] == "synthetic"
    assert bundle_config(Config()) == {}  # the baseline has nothing to say


def test_bundle_exit_codes_are_pgolf_trains():
    assert BUNDLE_EXIT_CODES == STATUS_EXIT_CODES


def test_bundled_main_runs_only_the_recipe_it_was_packed_with(tmp_path, monkeypatch, capsys):
    """The runner sets the seed, run name and data paths; any other key is refused before
    training, naming the key and `pgolf train` (the recipe was checked when its run was configured)."""
    monkeypatch.delenv("ITERATIONS", raising=False)
    packed = bundle_config(tiny_config(tmp_path))
    assert run_bundled(packed, ["export.gptq=true"]) == 2
    err = capsys.readouterr().err
    assert "export.gptq=True would change the recipe" in err and "pgolf train" in err
    monkeypatch.setenv("ITERATIONS", "5")
    assert run_bundled(packed, []) == 2
    assert "train.iterations=5" in capsys.readouterr().err
    monkeypatch.delenv("ITERATIONS")
    cfg = config_from_dict(packed)
    runner = config_from_dict(packed)
    for key, value in (("train.seed", 3), ("run.run_id", "x"), ("data.data_path", "/elsewhere"),
                       ("data.tokenizer_path", "/elsewhere/t.model")):
        section, name = key.split(".")
        setattr(getattr(runner, section), name, value)
    assert recipe_changes(cfg, runner) == []
    runner.train.iterations += 1
    assert recipe_changes(cfg, runner) == [f"train.iterations={runner.train.iterations}"]


def test_bundled_main_refuses_a_compressor_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """Checked before training: the artifact is compressed at the end of the run."""
    def missing(name):
        raise ArtifactError(f"export.compressor={name} needs a module this machine lacks")

    packed = bundle_config(tiny_config(tmp_path, "export.compressor=lzma"))
    monkeypatch.setattr(container_module, "check_compressor", missing)
    assert run_bundled(packed, []) == 2
    assert "export.compressor=lzma needs" in capsys.readouterr().err


def test_submit_ships_the_compressor_that_was_counted():
    assert compressor_of(bundle_module.code_bytes_for(Config(), "lzma")[1]) == "lzma"
    assert compressor_of("the length of this file, train_gpt.py; sha256:0123456789abcdef") is None


def test_bundled_main_refuses_a_bad_override(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NUM_LAYERS", raising=False)
    assert run_bundled(bundle_config(tiny_config(tmp_path)), ["model.num_layer=3"]) == 2
    assert "did you mean 'num_layers'" in capsys.readouterr().err
    monkeypatch.setenv("NUM_LAYERS", "three")
    assert run_bundled(bundle_config(tiny_config(tmp_path)), []) == 2
    assert "NUM_LAYERS" in capsys.readouterr().err


def run_beside(cfg: Config, tmp_path: Path) -> tuple[dict, dict, Path]:
    """Train cfg in process (run id `pgolf`), then its train_gpt.py in a clean interpreter (cwd
    outside the source tree, only a decoy pgolf on the path) with SEED and RUN_ID from the
    environment: (our summary, its summary, the bundle)."""
    ours = run_training(cfg, console=False)
    work = tmp_path / "submission"
    work.mkdir()
    bundle = work / "train_gpt.py"
    bundle.write_bytes(build_bundle(cfg))
    # A decoy pgolf that any ordinary `import pgolf` finds first (and whose import fails): the
    # bundle must serve its own modules ahead of every installed or path package.
    decoy = tmp_path / "decoy" / "pgolf"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy pgolf was imported, not the bundle')\n")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(decoy.parent), "SEED": str(cfg.train.seed), "RUN_ID": "bundled"}
    probe = subprocess.run([sys.executable, "-c", "import pgolf"], cwd=work, env=env, capture_output=True, text=True)
    assert "decoy pgolf was imported" in probe.stderr
    proc = subprocess.run([sys.executable, "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pgolf modules used were loaded from {bundle}" in proc.stdout
    theirs = read_json(work / "runs" / "bundled" / "summary.json")
    assert losses(work / "runs" / "bundled") == losses(Path(cfg.run.runs_dir) / "pgolf")
    assert theirs["roundtrip"] == ours["roundtrip"] and theirs["pre_quant"] == ours["pre_quant"]
    assert theirs["size"]["code_bytes"] == bundle.stat().st_size == ours["size"]["code_bytes"]
    return ours, theirs, bundle


def test_bundled_train_gpt_trains_exactly_like_pgolf(tmp_path, one_cpu_thread):
    """Same losses, same roundtrip score, and its code bytes are its own length, which is what
    the in-process run counted."""
    cfg = tiny_config(tmp_path, "train.iterations=3", "train.val_loss_every=0", "train.warmup_steps=1",
                      "train.seed=7", "run.run_id=pgolf")
    ours, theirs, bundle = run_beside(cfg, tmp_path)
    assert len(losses(tmp_path / "runs" / "pgolf")) == 3
    assert "this file" in theirs["size"]["code_description"]
    assert sha(theirs["size"]["code_description"]) == sha(ours["size"]["code_description"])
    saved = read_json(bundle.parent / "runs" / "bundled" / "config.json")
    assert saved["preset"] == "train_gpt.py" and saved["config"]["train"]["seed"] == 7
    assert json.loads(json.dumps(bundle_config(saved["config"]))) == bundle_config(cfg)


# The record presets at a CPU scale on the shared sample (their bundles shake out different
# code: GPTQ, SDClip, LQER, the loop, document masks, Parallel Muon off on one CPU process).
SMALL_RECORD = ["model.vocab_size=1024", "model.num_layers=4", "model.model_dim=64", "model.num_heads=2",
                "model.num_kv_heads=1", "train.iterations=3", "train.warmup_steps=0", "train.train_batch_tokens=2048",
                "train.train_seq_len=128", "train.val_batch_size=8192", "train.val_loss_every=0",
                "train.val_max_tokens=4096", "train.max_wallclock_seconds=0", "export.gptq_seqs=4",
                "train.seed=5", "run.run_id=pgolf"]
RECORD_SCALE = {"pr549": ["model.bigram_buckets=64", "model.bigram_dim=16", "model.xsa_layers=2,3",
                          "model.ve_layers=2,3", "model.ve_dim=16"],
                "pr1855": ["data.caseops=false", "model.xsa_layers=0,1,2,3", "model.rope_dims=8", "model.loop_start=1",
                           "model.loop_end=2", "model.parallel_from=2", "model.max_span=128",
                           "export.lqer_top=1"]}


@pytest.mark.parametrize("preset", sorted(RECORD_SCALE))
def test_record_preset_bundles_train_exactly_like_pgolf(preset, tmp_path, one_cpu_thread):
    if not SAMPLE.is_dir():
        pytest.skip(f"needs the shared sample at {SAMPLE}")
    cfg, _ = resolve_config(preset, [f"data.data_path={SAMPLE}", f"data.tokenizer_path={SAMPLE}/fineweb_1024_bpe.model",
                                     f"run.runs_dir={tmp_path / 'runs'}", *SMALL_RECORD, *RECORD_SCALE[preset]], env={})
    run_beside(cfg, tmp_path)


def test_shake_drops_only_what_nothing_shipped_refers_to():
    sources = {
        "pgolf.a": "import functools\n\n\ndef used():\n    return helper()\n\n\ndef helper():\n    return 1\n\n\n"
                   "def unused():\n    return 2\n\n\n@functools.cache\ndef registered():\n    return 3\n\n\n"
                   "def by_name():\n    return 4\n\n\nclass Dead:\n    pass\n\n\ndef __getattr__(name):\n    raise AttributeError(name)\n",
        "pgolf.b": "from pgolf.a import used\n\nVALUE = used()\nLOOKUP = getattr(object, 'by_name', None)\n",
    }
    shaken = shake(sources)
    assert shaken["pgolf.b"] == sources["pgolf.b"]
    kept = shaken["pgolf.a"]
    for name in ("def used", "def helper", "def registered", "def by_name", "def __getattr__"):
        assert name in kept, name  # referenced, reached from a kept one, decorated, named as a string, dunder
    assert "def unused" not in kept and "class Dead" not in kept
    exec(compile(kept, "pgolf/a.py", "exec"), {})  # still a valid module


def test_shake_drops_all_unless_a_shipped_module_star_imports():
    listed = "__all__ = ['used', 'unused']\n\n\ndef used():\n    return 1\n\n\ndef unused():\n    return 2\n"
    shaken = shake({"pgolf.a": listed, "pgolf.b": "from pgolf.a import used\n\nVALUE = used()\n"})["pgolf.a"]
    assert "__all__" not in shaken and "def unused" not in shaken and "def used" in shaken
    starred = shake({"pgolf.a": listed, "pgolf.b": "from pgolf.a import *\n"})["pgolf.a"]
    assert starred == listed  # `import *` reads __all__, and every name it lists stays



def test_shake_drops_the_registry_entries_the_config_does_not_choose():
    """`@SLOT.register(name)` keeps a definition only while its config chooses it (or shipped
    code names it); other decorators still keep theirs."""
    registry = ('MLPS = Registry("mlp", "model.mlp", "mlp")\nLAYOUTS = Registry("layout", "model.layout", None, '
                'auto=True)\nPLAIN = "plain"\n\n\n@MLPS.register("relu2")\nclass Relu2:\n    pass\n\n\n'
                '@MLPS.register("swiglu")\nclass SwiGLU:\n    pass\n\n\n@MLPS.register(PLAIN)\nclass Plain:\n    pass\n\n\n'
                '@MLPS.register("named")\nclass Named:\n    pass\n\n\n@LAYOUTS.register("unet")\ndef unet():\n    pass\n\n\n'
                "assert Named\n")
    sources = {"pgolf.model.registry": registry}
    cfg = Config()
    assert cfg.model.mlp == "relu2" and cfg.model.layout == "auto"
    unselected = bundle_module.unselected_entries(cfg, sources)
    assert unselected == {("MLPS", "swiglu"), ("MLPS", "plain"), ("MLPS", "named")}  # auto keeps every layout
    kept = shake(sources, unselected=unselected)["pgolf.model.registry"]
    assert "class Relu2" in kept and "class Named" in kept and "def unet" in kept
    assert "SwiGLU" not in kept and "Plain" not in kept and '"swiglu"' not in kept  # decorator lines go too


    class Registry:  # what the shaken module's decorators call
        def __init__(self, *args, **kwargs):
            pass

        def register(self, name):
            return lambda builder: builder

    exec(compile(kept, "registry.py", "exec"), {"Registry": Registry})  # still a valid module


def test_shake_prunes_imports_of_what_it_drops():
    """An import alone keeps nothing alive; the names nothing live uses leave the import (the
    module itself still runs: it may register entries), imports of modules stay."""
    sources = {
        "pgolf.a": "def used():\n    return 1\n\n\ndef checks():\n    return 2\n",
        "pgolf.b": "from pgolf.a import (checks,\n                     used)\nfrom pgolf.a import checks as c\n"
                   "from pgolf import a\n\nVALUE = used()\n",
    }
    shaken = shake(sources)
    assert "def checks" not in shaken["pgolf.a"]
    assert shaken["pgolf.b"] == "from pgolf.a import used\nimport pgolf.a\nfrom pgolf import a\n\nVALUE = used()\n"


def test_shake_ignores_signature_annotations():
    """minify_source removes argument and return annotations, so a type named only there is not
    shipped (a lock class named in `lock: RunLock | None`); class field annotations still count."""
    sources = {"pgolf.a": "from __future__ import annotations\n\n\nclass Lock:\n    pass\n\n\nclass Field:\n    pass\n\n\n"
                          "class Row:\n    kind: Field\n\n\ndef run(lock: Lock | None = None) -> Lock:\n    return lock\n",
               "pgolf.b": "from pgolf.a import Row, run\n\nVALUE = run(), Row\n"}
    kept = shake(sources)["pgolf.a"]
    assert "class Lock" not in kept and "class Field" in kept and "def run" in kept
    exec(compile(kept, "pgolf/a.py", "exec"), {})


def test_shipped_modules_never_evaluate_signature_annotations():
    """What shake_ignores_signature_annotations relies on before minifying: every module that
    annotates a signature postpones annotations."""
    for name, source in bundle_modules(Config()).items():
        tree = ast.parse(source)
        annotated = any(getattr(n, "annotation", None) is not None or getattr(n, "returns", None) is not None
                        for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.FunctionDef, ast.AsyncFunctionDef)))
        postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                        and any(a.name == "annotations" for a in n.names) for n in tree.body)
        assert postponed or not annotated, name


def test_shake_drops_unreferenced_tables_but_not_what_runs_code():
    sources = {"pgolf.a": "import re\n\n\ndef f():\n    return 1\n\n\nUNUSED = {1: 'a', 2: f}\nUSED = (1, 2)\n"
                          "PATTERN = re.compile('x')\nCALLED = f()\n__version__ = '1'\n",
               "pgolf.b": "from pgolf.a import USED\n\nprint(USED)\n"}
    kept = shake(sources)["pgolf.a"]
    assert "UNUSED" not in kept and "USED = (1, 2)" in kept  # a table only its own definition names
    assert "PATTERN" in kept and "CALLED" in kept and "__version__" in kept  # calls may do anything; dunders stay
    assert "def f" in kept  # CALLED's call keeps it


def test_every_preset_bundle_imports_all_it_ships(tmp_path):
    """Each configs/*.toml bundle, in one clean interpreter (a decoy pgolf on the path): every
    module it ships imports from the bundle, so nothing it uses at import was shaken or pruned."""
    plan = []
    for path in sorted(PRESETS.glob("*.toml")):
        cfg, _ = resolve_config(str(path), [], env={})
        bundle = tmp_path / path.stem / "train_gpt.py"
        bundle.parent.mkdir()
        bundle.write_bytes(build_bundle(cfg))
        plan.append((str(bundle), sorted(shipped_sources(cfg))))
    script = (
        "import importlib, json, runpy, sys\n"
        f"for path, modules in json.loads({json.dumps(json.dumps(plan))}):\n"
        "    runpy.run_path(path, run_name='bundle')  # puts its importer first on sys.meta_path\n"
        "    for name in modules:\n"
        "        assert importlib.import_module(name).__file__.startswith(path), name\n"
        "    sys.meta_path.pop(0)\n"
        "    for name in [n for n in sys.modules if n == 'pgolf' or n.startswith('pgolf.')]:\n"
        "        del sys.modules[name]\n"
        "print('imported', len(modules))\n")
    decoy = tmp_path / "decoy" / "pgolf"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy pgolf was imported, not the bundle')\n")
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(decoy.parent)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_shake_drops_the_methods_nothing_names_in_plain_classes():
    """A method nothing shipped names goes from a class only pgolf calls; a class with a base from
    outside (nn.Module: torch calls forward) keeps every method, and dunders always stay."""
    sources = {"pgolf.a": ("import torch\n\n\nclass Base:\n    def used(self):\n        return self.helper()\n\n"
                           "    def helper(self):\n        return 1\n\n    def unused(self):\n        return 2\n\n"
                           "    @property\n    def also_unused(self):\n        return 3\n\n\n"
                           "class Child(Base):\n    def only(self):\n        return 4\n\n\n"
                           "class Net(torch.nn.Module):\n    def forward(self, x):\n        return x\n\n"
                           "    def __repr__(self):\n        return 'Net'\n"),
               "pgolf.b": "from pgolf.a import Base, Child, Net\n\nprint(Base().used(), Child, Net)\n"}
    kept = shake(sources)["pgolf.a"]
    assert "def used" in kept and "def helper" in kept and "def forward" in kept and "__repr__" in kept
    assert "def unused" not in kept and "also_unused" not in kept
    assert "class Child(Base):\n    pass\n" in kept  # emptied: a pass keeps the class valid
    exec(compile(kept, "pgolf/a.py", "exec"), {})
