"""docs/ADDING_A_TECHNIQUE.md's worked example runs and keeps the technique contract."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from pgolf.compress.container import pack_artifact, unpack_artifact
from pgolf.compress.quant import dequantize_state_dict, quantize_state_dict
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.model.registry import EMBEDDING_ADDONS
from pgolf.model.roles import Role, export_treatment, param_roles
from pgolf.train.optim import build_optimizers
from pgolf.train.config import OptimConfig
from tests.model.test_registry import TINY

DOC = Path(__file__).resolve().parents[1] / "docs" / "ADDING_A_TECHNIQUE.md"


@pytest.fixture
def example():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)[1]
    module = types.ModuleType("pgolf_docs_example")
    sys.modules[module.__name__] = module
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    del EMBEDDING_ADDONS["prev_token_mix"], sys.modules[module.__name__]


def test_the_worked_example_keeps_the_contract(example, one_cpu_thread):
    torch.manual_seed(0)
    base = GPT(ModelConfig(**TINY))
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, embed=["prev_token_mix"]))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x, x), base(x, x))  # a zero gate changes nothing at initialisation
    assert param_roles(model)["embed_addons.0.gate"] is Role.GATE
    build_optimizers(model, OptimConfig(), torch.device("cpu"))  # every parameter in one group
    with torch.no_grad():
        model.embed_addons[0].gate.fill_(0.5)
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.embed_addons[0].gate.grad).all()
    qdict = quantize_state_dict(model.state_dict(), roles=export_treatment(model))[0]
    assert qdict["embed_addons.0.gate"].data.dtype == torch.float16  # GATE: fp16 passthrough
    restored = GPT(ModelConfig(**TINY, embed=["prev_token_mix"]))
    restored.load_state_dict(dequantize_state_dict(unpack_artifact(pack_artifact(qdict, meta={}))[0]), strict=True)
