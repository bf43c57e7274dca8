"""mrvi_pyro.optim.Adam: torch's fused Adam update without torch.optim (and its torch._dynamo import)."""

import copy
import importlib
import subprocess
import sys

import pytest
import torch

from mrvi_pyro.optim import Adam

train_module = importlib.import_module("mrvi_pyro.train")


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((5, 3), (7,), (2, 2))]


def _copy(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _run(optimizers_and_params, steps, first=0, seed=1):
    """Give every optimiser's parameters the same gradients and step; the third parameter has
    no gradient in the first three steps (skipped: no decay, no moment update)."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(first, first + steps):
        grads = [torch.randn(p.shape, generator=generator) for p in optimizers_and_params[0][1]]
        for optimizer, params in optimizers_and_params:
            for i, (p, g) in enumerate(zip(params, grads)):
                if not (step < 3 and i == 2):
                    p.grad = g.clone()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def _same_state(a: dict, b: dict) -> bool:
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k][name], b["state"][k][name]) for k in a["state"] for name in a["state"][k])


def test_adam_is_bit_equal_to_torch_fused_adam_and_has_its_state_dict():
    settings = {"lr": 2.83e-3, "eps": 1e-8, "weight_decay": 1e-8}
    theirs_params, ours_params = _params(), _params()
    theirs = torch.optim.Adam(theirs_params, fused=True, **settings)
    ours = Adam(ours_params, **settings)
    _run([(theirs, theirs_params), (ours, ours_params)], steps=2)
    assert 2 not in ours.state_dict()["state"]  # skipped so far: no state, like torch's
    _run([(theirs, theirs_params), (ours, ours_params)], steps=20, first=2)
    assert all(torch.equal(a, b) for a, b in zip(theirs_params, ours_params))
    assert _same_state(theirs.state_dict(), ours.state_dict())


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_adam_state_dicts_load_across_implementations(direction):
    settings = {"lr": 1e-2, "eps": 1e-8, "weight_decay": 1e-4}
    first_params = _params()
    first = (torch.optim.Adam(first_params, fused=True, **settings) if direction == "torch_to_ours"
             else Adam(first_params, **settings))
    _run([(first, first_params)], steps=6)
    saved = copy.deepcopy(first.state_dict())  # as through a checkpoint file: torch's load keeps references
    resumed_params = _copy(first_params)
    resumed = (Adam(resumed_params, lr=1.0) if direction == "torch_to_ours"
               else torch.optim.Adam(resumed_params, fused=True, lr=1.0))
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == settings["lr"]  # the saved rates win, as in torch
    _run([(first, first_params), (resumed, resumed_params)], steps=5, first=6, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first_params, resumed_params))
    assert _same_state(first.state_dict(), resumed.state_dict())


def test_adam_refuses_bad_settings_and_mismatched_states():
    with pytest.raises(ValueError, match="empty"):
        Adam([], lr=1e-3)
    with pytest.raises(ValueError, match="Invalid Adam settings"):
        Adam(_params(), lr=-1.0)
    with pytest.raises(ValueError, match="floating"):
        Adam([torch.zeros(3, dtype=torch.int64)], lr=1e-3)
    state = Adam(_params(), lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="for 3 parameters, not 2"):
        Adam(_params()[:2], lr=1e-3).load_state_dict(state)


def test_make_adam_falls_back_to_torch_optim_without_the_fused_kernel(monkeypatch):
    assert type(train_module.make_adam(_params(), lr=1e-3)) is Adam
    monkeypatch.setattr(train_module, "fused_kernel_available", lambda params: False)
    assert isinstance(train_module.make_adam(_params(), lr=1e-3), torch.optim.Adam)


def test_train_does_not_import_torch_dynamo():
    """The first train() of a process used to import torch._dynamo through torch.optim (~1 s)."""
    code = (
        "import sys, warnings\n"
        "warnings.filterwarnings('ignore')\n"
        "from mrvi_pyro import MRVI, datasets\n"
        "adata = datasets.simulate(n_cells=300, n_genes=100, n_samples=4, n_batches=2, seed=0)\n"
        "MRVI.setup_anndata(adata, sample_key='sample', batch_key='batch')\n"
        "model = MRVI(adata, seed=0)\n"
        "model.train(max_epochs=2, batch_size=128, progress_bar=False)\n"
        "assert len(model.history) == 2\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
