"""Registries of model components: every registered component passes its contract, names resolve
and refuse clearly, saved models name their components and load only what is registered."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import mrvi_pyro
from mrvi_pyro import MRVI, MrVIModule, components
from mrvi_pyro.components import CONTRACT_KINDS, check_contract

from ._guides import student_t_guide

REGISTERED = [(kind, name) for kind, registry in CONTRACT_KINDS.items() for name in registry.names()]


@pytest.mark.parametrize(("kind", "name"), REGISTERED, ids=[f"{k}-{n}" for k, n in REGISTERED])
def test_every_registered_component_passes_its_contract(kind, name):
    check_contract(kind, name)


@pytest.fixture
def scratch_registries(monkeypatch):
    """Registrations made by a test are undone after it."""
    for registry in (*CONTRACT_KINDS.values(), components.MODULE_CLASSES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))


class _ConstantShift(nn.Module):
    """A sample mapper that breaks the contract: it ignores the samples' axis."""

    def __init__(self, config):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(config["n_latent"]))

    def forward(self, u, sample_index=None):
        return self.shift.expand(*u.shape[:-1], -1)


class _ScaledPoisson(nn.Module):
    """A likelihood that breaks the contract: its mean is twice exp(log_mu)."""

    def __init__(self, config):
        super().__init__()

    def forward(self, log_mu, theta):
        return torch.distributions.Poisson(2 * log_mu.exp())


class _StudentTPrior(nn.Module):
    """A heavy-tailed prior on u (passes the contract)."""

    def __init__(self, config):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(config["n_latent_u"]))

    def forward(self, label_index=None):
        import pyro.distributions as dist

        return dist.StudentT(4.0, torch.zeros_like(self.log_scale), self.log_scale.exp()).to_event(1)


def test_contract_check_names_the_broken_rule(scratch_registries):
    mrvi_pyro.register_sample_mapper("constant", _ConstantShift)
    with pytest.raises(ValueError, match=r"sample_mapper 'constant' breaks its contract: sample_index=None gives"):
        check_contract("sample_mapper", "constant")
    mrvi_pyro.register_likelihood("scaled", _ScaledPoisson)
    with pytest.raises(ValueError, match=r"likelihood 'scaled' breaks its contract: its mean must equal exp"):
        check_contract("likelihood", "scaled")
    mrvi_pyro.register_prior("student_t", _StudentTPrior)
    check_contract("u_prior", "student_t")
    with pytest.raises(ValueError, match="kind must be one of"):
        check_contract("decoder", "x")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"likelihood 'zinb' is not registered; registered: \['nb', 'poisson'.*"
                                         r"register_likelihood\(name, factory\)"):
        MrVIModule(30, 4, 2, likelihood="zinb")
    with pytest.raises(ValueError, match=r"u_prior 'laplace' is not registered; registered: \['mixture', 'normal'"):
        MrVIModule(30, 4, 2, u_prior="laplace")
    with pytest.raises(ValueError, match=r"guide 'mine' is not registered; registered: \['mrvi'"):
        MrVIModule(30, 4, 2, guide="mine")


def test_registration_rules(scratch_registries):
    with pytest.raises(ValueError, match="'nb' is a built-in likelihood and cannot be replaced"):
        mrvi_pyro.register_likelihood("nb", _ScaledPoisson)
    mrvi_pyro.register_likelihood("scaled", _ScaledPoisson)
    mrvi_pyro.register_likelihood("scaled", _ScaledPoisson)  # the same factory again: fine
    with pytest.raises(ValueError, match="A different likelihood is already registered as 'scaled'.*overwrite=True"):
        mrvi_pyro.register_likelihood("scaled", _StudentTPrior)
    mrvi_pyro.register_likelihood("scaled", _StudentTPrior, overwrite=True)
    assert components.LIKELIHOODS.get("scaled") is _StudentTPrior
    with pytest.raises(TypeError, match="must be callable"):
        mrvi_pyro.register_prior("p", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        mrvi_pyro.register_prior("", _StudentTPrior)

    def returns_a_tensor(config):
        return torch.zeros(3)

    mrvi_pyro.register_prior("tensor", returns_a_tensor)
    with pytest.raises(TypeError, match="u_prior factory registered as 'tensor' must return a torch.nn.Module"):
        MrVIModule(30, 4, 2, u_prior="tensor")


def test_prior_arguments():
    assert MrVIModule(30, 4, 2, u_prior_mixture=False).config["u_prior"] == "normal"
    assert MrVIModule(30, 4, 2, u_prior="normal").config["u_prior"] == "normal"
    assert MrVIModule(30, 4, 2).config["u_prior"] == "mixture"
    with pytest.raises(ValueError, match="u_prior='mixture' and u_prior_mixture=False disagree"):
        MrVIModule(30, 4, 2, u_prior="mixture", u_prior_mixture=False)


def test_from_config_is_the_construction_path(small_adata):
    """MRVI builds its module through _module_cls.from_config; a registry or its dimensions work."""
    from mrvi_pyro.data import get_registry

    torch.manual_seed(0)
    a = MrVIModule.from_config(get_registry(small_adata), n_latent=8, n_latent_u=4)
    torch.manual_seed(0)
    b = MrVIModule.from_config({"n_genes": small_adata.n_vars, "n_samples": 6, "n_batches": 2}, n_latent=8,
                               n_latent_u=4)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(model.module.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown \\['n_cells'\\], missing \\['n_samples'\\]"):
        MrVIModule.from_config({"n_genes": 3, "n_cells": 4})
    with pytest.raises(TypeError, match="registry_or_dims must be a data registry"):
        MrVIModule.from_config((3, 4))
    assert model.init_params == {**MrVIModule.default_arguments(), "n_latent": 8, "n_latent_u": 4,
                                 "scale_observations": False}


class WiderTheta(MrVIModule):
    """A variant with its own constructor argument and parameter (defined at module level, so a
    saved model can find it again once this module is imported)."""

    def __init__(self, *args, theta_offset: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.theta_shift = nn.Parameter(torch.full((self.config["n_genes"],), float(theta_offset)))

    @property
    def theta(self):
        return (self.log_theta + self.theta_shift).exp()


class WiderMRVI(MRVI):
    _module_cls = WiderTheta


def test_module_subclass_through_the_facade_save_and_load(small_adata, tmp_path, scratch_registries):
    model = WiderMRVI(small_adata, n_latent=8, n_latent_u=4, theta_offset=0.5)
    assert isinstance(model.module, WiderTheta) and model.init_params["theta_offset"] == 0.5
    model.train(max_epochs=2, progress_bar=False)
    assert model.module.theta_shift.abs().sub(0.5).abs().max() > 0  # trained
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["module_class"] == f"{__name__}.WiderTheta" and meta["guide"] == "mrvi"
    assert meta["format_version"] == 2
    loaded = MRVI.load(tmp_path / "m", adata=small_adata)  # the plain facade: the file names the class
    assert type(loaded.module) is WiderTheta
    np.testing.assert_array_equal(loaded.get_normalized_expression(return_numpy=True),
                                  model.get_normalized_expression(return_numpy=True))
    # a model file never imports: an unregistered class name is an error saying what to do
    meta["module_class"] = "os.system"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"saved with the module class 'os.system', which is not registered.*"
                                         r"import \(or run\) the code that defines it"):
        MRVI.load(tmp_path / "m", adata=small_adata)


def test_registered_components_are_saved_by_name_and_required_on_load(small_adata, tmp_path, scratch_registries):
    mrvi_pyro.register_prior("student_t", _StudentTPrior)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, u_prior="student_t")
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["init_params"]["u_prior"] == "student_t"
    loaded = MRVI.load(tmp_path / "m", adata=small_adata)
    torch.testing.assert_close(loaded.module.u_prior.log_scale, model.module.u_prior.log_scale, rtol=0, atol=0)
    del components.PRIORS._entries["student_t"]
    with pytest.raises(ValueError, match=r"saved with the u_prior 'student_t', which is not registered in this "
                                         r"process \(registered: \['mixture', 'normal'\]\).*register_prior"):
        MRVI.load(tmp_path / "m", adata=small_adata)


def test_tensors_outside_the_state_dict_are_refused_on_load(small_adata, tmp_path, scratch_registries):
    class Cached(MrVIModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("cache", torch.ones(3), persistent=False)

    class CachedMRVI(MRVI):
        _module_cls = Cached

    CachedMRVI(small_adata, n_latent=8, n_latent_u=4).save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"keeps tensors outside its state_dict \(\['cache'\]\)"):
        MRVI.load(tmp_path / "m", adata=small_adata)


def test_registered_guide_is_found_again_without_passing_it(small_adata, tmp_path, scratch_registries):
    mrvi_pyro.register_guide("student_t", student_t_guide)
    check_contract("guide", "student_t")
    for given in ("student_t", student_t_guide):  # by name or by function: the file names it either way
        model = MRVI(small_adata, n_latent=8, n_latent_u=4, guide=given)
        model.save(tmp_path / "m", overwrite=True)
        assert json.loads((tmp_path / "m" / "model.json").read_text())["guide"] == "student_t"
        assert MRVI.load(tmp_path / "m", adata=small_adata).module.guide_program is student_t_guide
    del components.GUIDES._entries["student_t"]
    with pytest.raises(ValueError, match=r"saved with the guide 'student_t', which is not registered.*register_guide"):
        MRVI.load(tmp_path / "m", adata=small_adata)
    assert MRVI.load(tmp_path / "m", adata=small_adata, guide=student_t_guide).module.guide_program is student_t_guide


def test_unregistered_guide_warns_on_save_and_is_required_on_load(small_adata, tmp_path):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, guide=student_t_guide)
    with pytest.warns(UserWarning, match="The guide 'student_t_guide' is not registered"):
        model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"saved with the unregistered guide 'student_t_guide'; pass it with"):
        MRVI.load(tmp_path / "m", adata=small_adata)
    assert MRVI.load(tmp_path / "m", adata=small_adata, guide=student_t_guide).module.guide_program is student_t_guide
