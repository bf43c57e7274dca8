"""The MRVI facade: latent space, expression, options and conventions."""

import inspect

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch

from mrvi_pyro import MRVI


def test_latent_representation(trained_model, sim_adata):
    u = trained_model.get_latent_representation()
    z = trained_model.get_latent_representation(give_z=True)
    assert u.shape == (sim_adata.n_obs, 10) and z.shape == (sim_adata.n_obs, 30)
    # chunking does not change the result
    np.testing.assert_allclose(u, trained_model.get_latent_representation(batch_size=37), rtol=1e-5, atol=1e-6)
    sub = trained_model.get_latent_representation(indices=[5, 1, 9])
    np.testing.assert_allclose(sub, u[[5, 1, 9]], rtol=1e-5, atol=1e-6)
    draw1 = trained_model.get_latent_representation(use_mean=False, seed=1)
    draw2 = trained_model.get_latent_representation(use_mean=False, seed=1)
    np.testing.assert_array_equal(draw1, draw2)
    assert not np.allclose(draw1, u)
    # a posterior draw stays near its mean (the posterior is concentrated)
    assert np.mean(np.abs(draw1 - u)) < np.mean(np.abs(u - u.mean(0)))


def test_latent_representation_on_other_adata(trained_model, sim_adata):
    subset = sim_adata[sim_adata.obs["sample"].isin(["sample_03", "sample_07"])].copy()
    u_sub = trained_model.get_latent_representation(subset)
    mask = sim_adata.obs["sample"].isin(["sample_03", "sample_07"]).to_numpy()
    np.testing.assert_allclose(u_sub, trained_model.get_latent_representation()[mask], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same genes"):
        trained_model.get_latent_representation(sim_adata[:, :50].copy())


def test_normalized_expression(trained_model, sim_adata):
    expr = trained_model.get_normalized_expression(indices=np.arange(50), library_size=1.0)
    assert isinstance(expr, pd.DataFrame) and expr.shape == (50, sim_adata.n_vars)
    assert list(expr.columns) == list(sim_adata.var_names)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    kwargs = {"indices": np.arange(50), "library_size": 1.0}
    b0 = trained_model.get_normalized_expression(**kwargs, transform_batch="batch_0")
    b1 = trained_model.get_normalized_expression(**kwargs, transform_batch="batch_1")
    both = trained_model.get_normalized_expression(**kwargs, transform_batch=["batch_0", "batch_1"])
    np.testing.assert_allclose(both, (b0 + b1) / 2, rtol=1e-4, atol=1e-7)
    assert not np.allclose(b0, b1)  # the nuisance block does something
    draws = trained_model.get_normalized_expression(indices=np.arange(20), n_samples=4, return_mean=False)
    assert draws.shape == (4, 20, sim_adata.n_vars)
    scaled = trained_model.get_normalized_expression(indices=np.arange(5), library_size=1e4)
    np.testing.assert_allclose(scaled.sum(1), 1e4, rtol=1e-4)
    # the decoded profile tracks the observed one: genes' mean expression correlates
    observed = sim_adata.X / sim_adata.X.sum(1, keepdims=True)
    predicted = trained_model.get_normalized_expression(library_size=1.0).to_numpy()
    assert np.corrcoef(np.log(observed.mean(0) + 1e-6), np.log(predicted.mean(0)))[0, 1] > 0.95
    with pytest.raises(ValueError, match="transform_batch"):
        trained_model.get_normalized_expression(transform_batch="batch_9")


def test_normalized_expression_reference_defaults(trained_model, sim_adata):
    """scvi-tools' defaults: library_size="latent" (observed totals), n_samples=1, return_mean=False."""
    idx = np.arange(30)
    default = trained_model.get_normalized_expression(indices=idx)
    totals = np.asarray(sim_adata.X[idx].sum(1)).ravel()
    np.testing.assert_allclose(default.sum(1), totals, rtol=1e-4)
    proportions = trained_model.get_normalized_expression(indices=idx, library_size=1.0)
    np.testing.assert_allclose(default.to_numpy(), proportions.to_numpy() * totals[:, None], rtol=1e-5)
    # draws: seeded, and their mean approaches the decoded posterior mean
    kwargs = {"indices": idx, "library_size": 1.0, "n_samples": 200}
    mean = trained_model.get_normalized_expression(**kwargs, return_mean=True, seed=2)
    assert isinstance(mean, pd.DataFrame)
    draws = trained_model.get_normalized_expression(**kwargs, seed=2)
    np.testing.assert_allclose(mean.to_numpy(), draws.mean(0), rtol=1e-5)
    assert np.abs(np.log(mean.to_numpy()) - np.log(proportions.to_numpy())).mean() < 0.05
    np.testing.assert_array_equal(draws, trained_model.get_normalized_expression(**kwargs, seed=2))
    genes = list(sim_adata.var_names[[7, 3]])
    sub = trained_model.get_normalized_expression(indices=idx, gene_list=genes)
    assert list(sub.columns) == genes
    np.testing.assert_allclose(sub.to_numpy(), default[genes].to_numpy(), rtol=1e-6)
    assert isinstance(trained_model.get_normalized_expression(indices=idx, return_numpy=True), np.ndarray)
    with pytest.warns(UserWarning, match="return_numpy=False is ignored"):
        trained_model.get_normalized_expression(indices=idx, n_samples=2, return_numpy=False)
    # n_samples_overall: rows drawn from every cell's posterior draws (here 30 cells, 65 rows -> 3 draws each)
    overall = trained_model.get_normalized_expression(indices=idx, library_size=1.0, n_samples_overall=65, seed=4)
    assert overall.shape == (65, sim_adata.n_vars)
    pool = trained_model.get_normalized_expression(indices=idx, library_size=1.0, n_samples=3, seed=4)
    pool = pool.reshape(-1, pool.shape[-1])
    assert all(np.abs(pool - row).max(1).min() < 1e-7 for row in overall)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"weights": "importance"}, "weights must be None or 'uniform'"), ({"library_size": 0}, "library_size"),
     ({"library_size": "observed"}, "library_size"), ({"n_samples_overall": 10, "n_samples": 2}, "n_samples_overall"),
     ({"gene_list": ["not_a_gene"]}, "not in the model's genes")],
)
def test_normalized_expression_rejects_bad_arguments(trained_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trained_model.get_normalized_expression(indices=np.arange(5), **kwargs)


def test_indices_are_checked(trained_model):
    with pytest.raises(ValueError, match="indices must lie in"):
        trained_model.get_latent_representation(indices=[10**6])


def test_constructor_validates_options(small_adata):
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['typo'\] in px_kwargs"):
        MRVI(small_adata, px_kwargs={"typo": True})
    with pytest.raises(TypeError):
        MRVI(small_adata, not_an_argument=1)


def test_repr(trained_model):
    text = repr(trained_model)
    assert "trained" in text and "12" in text and "mixture" in text and "60 epochs" in text


def test_reference_argument_names():
    """The scvi-tools names an analyst relies on are all accepted."""
    expected = {
        "__init__": ["adata", "n_latent", "n_latent_u", "encoder_n_hidden", "encoder_n_layers", "z_u_prior",
                     "z_u_prior_scale", "u_prior_scale", "u_prior_mixture", "u_prior_mixture_k",
                     "learn_z_u_prior_scale", "scale_observations", "qz_kwargs", "px_kwargs", "qu_kwargs"],
        "setup_anndata": ["adata", "sample_key", "batch_key", "labels_key", "layer"],
        "train": ["max_epochs", "batch_size", "train_size", "validation_size", "early_stopping", "plan_kwargs"],
        "get_latent_representation": ["adata", "indices", "give_z", "use_mean", "batch_size"],
        "get_normalized_expression": ["adata", "indices", "transform_batch", "gene_list", "library_size", "n_samples",
                                      "n_samples_overall", "weights", "batch_size", "return_mean", "return_numpy"],
        "save": ["dir_path", "overwrite", "save_anndata"],
        "load": ["dir_path", "adata"],
    }
    for method, names in expected.items():
        params = set(inspect.signature(getattr(MRVI, method)).parameters)
        if method == "__init__":  # as scvi-tools' MRVI(adata, **model_kwargs): the module's arguments
            params |= set(MRVI._module_cls.default_arguments())
        assert set(names) <= params, (method, set(names) - params)


def test_public_methods_are_documented():
    for name, member in inspect.getmembers(MRVI, inspect.isfunction):
        if not name.startswith("_"):
            assert member.__doc__ and len(member.__doc__.strip()) > 20, name


def test_analyses_show_progress(trained_model, capsys):
    from mrvi_pyro.posterior import iter_posterior_u

    data = trained_model._cell_data()
    list(iter_posterior_u(trained_model.module, data, batch_size=500, progress_bar=True))
    err = capsys.readouterr().err
    assert "mrvi_pyro:" in err and "/2000" in err and "cells/s" in err
    list(iter_posterior_u(trained_model.module, data, batch_size=500, progress_bar=False))
    assert capsys.readouterr().err == ""


def test_train_accepts_reference_plan_kwargs_and_validation_size(small_adata):
    model = MRVI(small_adata, seed=0)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    result = model.train(max_epochs=2, batch_size=64, train_size=0.75, validation_size=0.25, progress_bar=False,
                         plan_kwargs={"lr": 1e-30, "n_epochs_kl_warmup": 4, "max_norm": 10.0, "optimizer": "Adam"})
    assert len(result.validation_indices) == 75 and len(result.train_indices) == 225
    np.testing.assert_allclose(model.history["kl_weight"], [0.0, 0.25])  # warm-up over 4 epochs reached train_svi
    after = model.module.state_dict()
    for k in before:  # lr=1e-30 reached the optimiser: nothing moved
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=1e-20)
    with pytest.raises(ValueError, match="lr must be None or a positive"):  # checked like the argument itself
        model.train(max_epochs=1, progress_bar=False, plan_kwargs={"lr": 0.0})


def test_plan_kwargs_map_to_train_svi_arguments(small_adata, monkeypatch):
    import mrvi_pyro.api as api

    seen = {}

    def fake_train_svi(module, data, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(api, "train_svi", fake_train_svi)
    model = MRVI(small_adata, seed=0)
    with pytest.raises(RuntimeError, match="stop"):
        model.train(max_epochs=1, plan_kwargs={"lr": 1e-3, "weight_decay": 1e-4, "eps": 1e-6,
                                               "gradient_clip_val": 5.0, "n_epochs_kl_warmup": 7})
    assert {k: seen[k] for k in ("lr", "weight_decay", "eps", "clip_norm", "n_epochs_kl_warmup", "train_size")} == {
        "lr": 1e-3, "weight_decay": 1e-4, "eps": 1e-6, "clip_norm": 5.0, "n_epochs_kl_warmup": 7, "train_size": 0.9}
    with pytest.raises(RuntimeError, match="stop"):  # without plan_kwargs the keyword defaults are the reference's
        model.train(max_epochs=1)
    assert (seen["lr"], seen["weight_decay"], seen["eps"], seen["clip_norm"], seen["n_epochs_kl_warmup"]) == (
        None, 1e-8, 1e-8, 40.0, 20)  # lr None: train_svi takes default_lr(batch_size), 2e-3 at batch 128


@pytest.mark.parametrize(
    "kwargs, match",
    [({"plan_kwargs": {"learning_rate": 1e-3}}, r"Unknown plan_kwargs \['learning_rate'\]"),
     ({"plan_kwargs": {"optimizer": "AdamW"}}, "optimizer"),
     ({"plan_kwargs": [("lr", 1e-3)]}, "plan_kwargs must be a dict"),
     ({"plan_kwargs": {"lr": 1e-3}, "lr": 1e-2}, "lr was given both"),
     ({"plan_kwargs": {"max_norm": 1.0, "gradient_clip_val": 2.0}}, "clip_norm twice"),
     ({"validation_size": 0.2}, r"train_size \(0.9\) \+ validation_size \(0.2\) must be 1"),
     ({"validation_size": 1.5}, r"validation_size must lie in \[0, 1\)")],
)
def test_train_rejects_bad_plan_kwargs(small_adata, kwargs, match):
    model = MRVI(small_adata, seed=0)
    with pytest.raises(ValueError, match=match):
        model.train(max_epochs=1, progress_bar=False, **kwargs)
    assert not model.is_trained


def test_latent_representation_key_added_writes_obsm(small_adata):
    model = MRVI(small_adata, n_latent=6, n_latent_u=4)
    adata = model.adata
    with pytest.warns(UserWarning, match="not been trained"):
        u = model.get_latent_representation(key_added="X_mrvi_u")
    assert adata.obsm["X_mrvi_u"].shape == (adata.n_obs, 4)
    np.testing.assert_array_equal(adata.obsm["X_mrvi_u"], u)
    with pytest.raises(ValueError, match="already has 'X_mrvi_u'; pass overwrite=True"):
        model.get_latent_representation(key_added="X_mrvi_u")
    np.testing.assert_array_equal(adata.obsm["X_mrvi_u"], u)  # refused: left as it was
    with pytest.warns(UserWarning, match="not been trained"):
        z = model.get_latent_representation(give_z=True, key_added="X_mrvi_u", overwrite=True)
    np.testing.assert_array_equal(adata.obsm["X_mrvi_u"], z)
    assert z.shape == (adata.n_obs, 6)
    with pytest.raises(ValueError, match="needs indices=None"):
        model.get_latent_representation(indices=[0, 1], key_added="X_sub")
    assert "X_sub" not in adata.obsm


def test_get_elbo_matches_the_validation_loss_and_rises_with_training(small_adata):
    """get_elbo (scvi-tools' name, higher is better) is the negative of the loss that training
    reports per cell (the same draw gives the same value), its per-cell values average to the
    mean, other chunks only change the draws, the caller's random state is left alone, and
    training raises it."""
    from mrvi_pyro.train import evaluate_loss

    model = MRVI(small_adata, seed=0)
    data = model._cell_data(None)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        loss = evaluate_loss(model.module, data, np.arange(small_adata.n_obs), batch_size=1024,
                             device=torch.device("cpu"))
    with pytest.warns(UserWarning, match="not been trained"):
        mean = model.get_elbo(seed=3)
    assert mean == pytest.approx(-loss, rel=1e-6)
    per_cell = model.get_elbo(return_mean=False, seed=3)
    assert per_cell.shape == (small_adata.n_obs,) and np.isfinite(per_cell).all()
    assert per_cell.mean() == pytest.approx(mean, rel=1e-12)
    chunked = model.get_elbo(return_mean=False, seed=3, batch_size=70)
    assert np.corrcoef(chunked, per_cell)[0, 1] > 0.9  # the same cells, other draws
    assert chunked.mean() == pytest.approx(mean, rel=0.01)
    assert model.get_elbo(indices=[4, 0], return_mean=False).shape == (2,)
    state = torch.get_rng_state()
    model.get_elbo()
    assert torch.equal(state, torch.get_rng_state())
    model.train(max_epochs=5, batch_size=128, progress_bar=False)
    assert model.get_elbo(seed=3) > mean + 10
    assert model.get_elbo(adata=small_adata.copy(), seed=3) == model.get_elbo(seed=3)
    with pytest.raises(ValueError, match="return_mean"):
        model.get_elbo(return_mean="yes")


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_get_reconstruction_error_is_minus_log_likelihood_at_the_posterior_draw(small_adata, likelihood):
    """scvi-tools' get_reconstruction_error: {"reconstruction_loss": -log p(x | u, z)} at one
    seeded posterior draw, equal to the same quantity computed by hand (the guide's draw, the
    decoder, the model's likelihood component), per cell and as a mean, in chunks too; training
    lowers it; the caller's random state is left alone."""
    model = MRVI(small_adata, seed=0, likelihood=likelihood)
    module, data, n = model.module, model._cell_data(None), small_adata.n_obs
    batch = data.batch(np.arange(n))
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        _, z = module.guide(batch["x"], batch["sample_index"], batch["batch_index"], batch["label_index"])
        log_mu = module.decode(z, batch["batch_index"]) + torch.log(batch["x"].sum(-1, keepdim=True))
        expected = -module.observation_distribution(log_mu).to_event(1).log_prob(batch["x"]).double().numpy()
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="not been trained"):
        result = model.get_reconstruction_error(return_mean=False, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert list(result) == ["reconstruction_loss"]
    np.testing.assert_allclose(result["reconstruction_loss"], expected, rtol=1e-6)
    mean = model.get_reconstruction_error(seed=3)["reconstruction_loss"]
    assert isinstance(mean, float) and mean == pytest.approx(expected.mean(), rel=1e-6)
    chunked = model.get_reconstruction_error(return_mean=False, seed=3, batch_size=70)["reconstruction_loss"]
    assert chunked.shape == (n,) and np.corrcoef(chunked, expected)[0, 1] > 0.9  # same cells, other draws
    sub = model.get_reconstruction_error(indices=[4, 0], return_mean=False)["reconstruction_loss"]
    assert sub.shape == (2,)
    model.train(max_epochs=5, batch_size=128, progress_bar=False)
    assert model.get_reconstruction_error(seed=3)["reconstruction_loss"] < mean - 5
    with pytest.raises(ValueError, match="return_mean"):
        model.get_reconstruction_error(return_mean=1)


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_posterior_predictive_sample_is_the_model_run_on_the_posterior_draw(small_adata, likelihood):
    """scvi-tools' posterior_predictive_sample: counts from the likelihood at one seeded posterior
    draw of (u, z), equal to the same draws made by hand (the guide, the decoder at the observed
    library size, the likelihood component's sample), as a CSR matrix; several draws, genes,
    a transform batch; the caller's random state is left alone."""
    model = MRVI(small_adata, seed=0, likelihood=likelihood)
    model.train(max_epochs=2, batch_size=128, progress_bar=False)
    module, data, n = model.module, model._cell_data(None), small_adata.n_obs
    batch = data.batch(np.arange(n))
    library = torch.log(batch["x"].sum(-1, keepdim=True))

    def by_hand(batch_index, n_draws=1):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(3)
            out = []
            for _ in range(n_draws):
                _, z = module.guide(batch["x"], batch["sample_index"], batch["batch_index"], batch["label_index"])
                out.append(module.observation_distribution(module.decode(z, batch_index) + library).sample().numpy())
        return out

    state = torch.get_rng_state()
    draw = model.posterior_predictive_sample(seed=3, batch_size=n)
    assert torch.equal(state, torch.get_rng_state())
    assert isinstance(draw, scipy.sparse.csr_matrix) and draw.shape == (n, small_adata.n_vars)
    assert draw.dtype == np.float32
    np.testing.assert_array_equal(draw.toarray(), by_hand(batch["batch_index"])[0])
    assert np.all(draw.data >= 0) and np.all(draw.data == np.round(draw.data))

    genes = list(small_adata.var_names[[7, 2, 30]])
    np.testing.assert_array_equal(model.posterior_predictive_sample(seed=3, batch_size=n, gene_list=genes).toarray(),
                                  draw.toarray()[:, [7, 2, 30]])
    several = model.posterior_predictive_sample(seed=3, batch_size=n, n_samples=3)
    assert several.shape == (n, small_adata.n_vars, 3)
    np.testing.assert_array_equal(several, np.stack(by_hand(batch["batch_index"], 3), axis=-1))
    level = small_adata.obs["batch"].cat.categories[1]
    moved = model.posterior_predictive_sample(seed=3, batch_size=n, transform_batch=level)
    np.testing.assert_array_equal(moved.toarray(), by_hand(torch.full_like(batch["batch_index"], 1))[0])
    assert not np.array_equal(moved.toarray(), draw.toarray())
    chunked = model.posterior_predictive_sample(seed=3, batch_size=70, indices=np.arange(100, 250))
    assert chunked.shape == (150, small_adata.n_vars)
    assert model.posterior_predictive_sample(seed=4).nnz > 0
    assert (model.posterior_predictive_sample(seed=4) != model.posterior_predictive_sample(seed=5)).nnz > 0


def test_posterior_predictive_sample_reproduces_the_data_of_a_trained_model(trained_model, sim_adata):
    """A posterior predictive check that a fitted model passes: the predictive draws' per-gene
    mean and share of zeros follow the data's, and each cell keeps its library size on average."""
    draws = trained_model.posterior_predictive_sample(n_samples=2, seed=0)
    x = sim_adata.X.toarray() if scipy.sparse.issparse(sim_adata.X) else np.asarray(sim_adata.X)
    gene_mean, drawn_mean = x.mean(0), draws.mean((0, 2))
    assert np.corrcoef(np.log1p(gene_mean), np.log1p(drawn_mean))[0, 1] > 0.98
    np.testing.assert_allclose(drawn_mean.sum(), gene_mean.sum(), rtol=0.05)
    zeros, drawn_zeros = (x == 0).mean(0), (draws == 0).mean((0, 2))
    assert np.abs(zeros - drawn_zeros).mean() < 0.05
    assert np.corrcoef(x.sum(1), draws.sum(1).mean(1))[0, 1] > 0.95


def test_posterior_predictive_sample_refuses_bad_input_and_oversized_results(small_adata):
    model = MRVI(small_adata, seed=0)
    model.is_trained = True  # the arguments are what is checked here, not the weights
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.posterior_predictive_sample(n_samples=0)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.posterior_predictive_sample(n_samples=2.5)
    with pytest.raises(ValueError, match="one nuisance level"):
        model.posterior_predictive_sample(transform_batch=["batch_0", "batch_1"])
    with pytest.raises(ValueError, match="not among the nuisance levels"):
        model.posterior_predictive_sample(transform_batch="nope")
    with pytest.raises(ValueError, match="not in the model's genes"):
        model.posterior_predictive_sample(gene_list=["nope"])
    for bad in (0, -1.0, float("nan"), True, "2", None):
        with pytest.raises(ValueError, match="max_in_memory_gb must be a positive number of GB"):
            model.posterior_predictive_sample(max_in_memory_gb=bad)
    size = 4 * small_adata.n_obs * small_adata.n_vars * 10 / 1e9
    with pytest.raises(ValueError, match=r"GB as a dense array, above max_in_memory_gb.*gene_list="):
        model.posterior_predictive_sample(n_samples=10, max_in_memory_gb=size / 2)
    assert model.posterior_predictive_sample(n_samples=10, max_in_memory_gb=size * 2).shape[-1] == 10


def test_posterior_predictive_sample_names_the_observed_sites_it_cannot_use(small_adata, monkeypatch):
    """A variant whose model observes more than the counts gets an error naming its observed sites."""
    import pyro
    import pyro.distributions as dist

    model = MRVI(small_adata, seed=0)
    model.is_trained = True
    original = model.module.model

    def two_observed(*args, **kwargs):
        original(*args, **kwargs)
        pyro.sample("extra", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    monkeypatch.setattr(model.module, "model", two_observed)
    with pytest.raises(ValueError, match=r"exactly one observed site.*'x' \(256, 60\), 'extra' \(\)"):
        model.posterior_predictive_sample()


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_get_likelihood_parameters_are_the_likelihoods_at_the_decoded_posterior(small_adata, likelihood):
    """scvi-tools' get_likelihood_parameters: the likelihood's mean (library x h, the expression
    get_normalized_expression gives at the observed library size, computed here by hand too) and,
    for the negative binomial only, theta per gene repeated over cells; draws and their mean."""
    model = MRVI(small_adata, seed=0, likelihood=likelihood)
    model.train(max_epochs=2, batch_size=128, progress_bar=False)
    module, data, n, g = model.module, model._cell_data(None), small_adata.n_obs, small_adata.n_vars
    batch = data.batch(np.arange(n))
    with torch.no_grad():
        module.eval()
        loc, _ = module.encode_u(batch["x"], batch["sample_index"])
        z = module.counterfactual_z(loc, batch["sample_index"])
        by_hand = (module.decode(z, batch["batch_index"]).exp() * batch["x"].sum(-1, keepdim=True)).numpy()
    params = model.get_likelihood_parameters(batch_size=70)
    assert sorted(params) == (["dispersions", "mean"] if likelihood == "nb" else ["mean"])
    assert params["mean"].shape == (n, g)
    np.testing.assert_allclose(params["mean"], by_hand, rtol=1e-5)
    np.testing.assert_allclose(params["mean"], model.get_normalized_expression(return_numpy=True), rtol=1e-6)
    if likelihood == "nb":
        np.testing.assert_array_equal(params["dispersions"], np.broadcast_to(module.theta.detach().numpy(), (n, g)))
    draws = model.get_likelihood_parameters(n_samples=3, seed=2)
    assert draws["mean"].shape == (3, n, g)
    np.testing.assert_allclose(draws["mean"], model.get_normalized_expression(n_samples=3, seed=2), rtol=1e-6)
    averaged = model.get_likelihood_parameters(n_samples=3, give_mean=True, seed=2)
    np.testing.assert_allclose(averaged["mean"], draws["mean"].mean(0), rtol=1e-5)
    assert not np.allclose(draws["mean"][0], draws["mean"][1])
    np.testing.assert_allclose(model.get_likelihood_parameters(indices=[5, 1])["mean"], params["mean"][[5, 1]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.get_likelihood_parameters(n_samples=0)
    with pytest.raises(ValueError, match="give_mean must be True or False"):
        model.get_likelihood_parameters(give_mean="yes")


def test_posterior_predictive_check_statistics_are_those_of_the_sampled_draws(small_adata):
    """Each row of posterior_predictive_check is the statistic of posterior_predictive_sample's
    draws (the same seed gives the same draws), computed here with numpy: median, interval,
    inside and ppp; the observed statistics are the data's."""
    model = MRVI(small_adata, seed=0)
    model.train(max_epochs=2, batch_size=128, progress_bar=False)
    table = model.posterior_predictive_check(n_samples=5, seed=3, batch_size=70, interval=0.8)
    draws = model.posterior_predictive_sample(n_samples=5, seed=3, batch_size=70).astype(np.float64)
    x = np.asarray(small_adata.X.toarray() if scipy.sparse.issparse(small_adata.X) else small_adata.X, dtype=float)

    def statistics(counts, axis):
        mean, var = counts.mean(axis), counts.var(axis, ddof=1)
        return {"mean": mean, "variance": var, "zero_fraction": (counts == 0).mean(axis),
                "cv": np.where(mean > 0, np.sqrt(var) / np.where(mean > 0, mean, 1), np.nan)}

    observed, replicated = statistics(x, 0), statistics(draws, 0)  # replicated: (genes, draws)
    assert list(table["statistic"].cat.categories) == ["mean", "variance", "zero_fraction", "cv"]
    assert len(table) == 4 * small_adata.n_vars and table.attrs["n_cells"] == small_adata.n_obs
    for name in observed:
        part = table[table["statistic"] == name]
        assert list(part["gene"]) == list(small_adata.var_names)
        rep = replicated[name].T
        low, mid, high = np.nanquantile(rep, [0.1, 0.5, 0.9], axis=0)
        np.testing.assert_allclose(part["observed"], observed[name], rtol=1e-9)
        np.testing.assert_allclose(part["replicated"], mid, rtol=1e-9)
        np.testing.assert_allclose(part["low"], low, rtol=1e-9)
        np.testing.assert_allclose(part["high"], high, rtol=1e-9)
        np.testing.assert_array_equal(part["inside"], (observed[name] >= low) & (observed[name] <= high))
        np.testing.assert_allclose(part["ppp"], np.where(np.isnan(observed[name]), np.nan,
                                                         (rep >= observed[name]).mean(0)))
    genes = list(small_adata.var_names[[3, 9]])
    some = model.posterior_predictive_check(n_samples=5, seed=3, batch_size=70, interval=0.8, gene_list=genes)
    np.testing.assert_allclose(some["ppp"], table.set_index(["statistic", "gene"]).loc[
        [(s, g) for s in ["mean", "variance", "zero_fraction", "cv"] for g in genes], "ppp"])
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        model.posterior_predictive_check(n_samples=0)
    with pytest.raises(ValueError, match="interval must be between 0 and 1"):
        model.posterior_predictive_check(interval=90)
    with pytest.raises(ValueError, match="at least 2 cells"):
        model.posterior_predictive_check(indices=[4])


def test_posterior_predictive_check_tells_a_fitted_model_from_an_untrained_one(trained_model, sim_adata):
    """On held-out cells, the trained model's replicated means, variances and shares of zeros
    cover the observed ones far more often than those of the same model untrained."""
    untrained = MRVI(sim_adata, seed=1)
    untrained.is_trained = True  # its random initial weights, on purpose
    cells = trained_model.validation_indices

    def coverage(model):
        table = model.posterior_predictive_check(indices=cells, n_samples=20, seed=0)
        return table.groupby("statistic", observed=True)["inside"].mean()

    fitted, unfitted = coverage(trained_model), coverage(untrained)
    assert fitted["mean"] > 0.5
    for name in ("mean", "variance", "zero_fraction"):
        assert fitted[name] > unfitted[name] + 0.25, (name, fitted[name], unfitted[name])


def test_get_latent_library_size_is_the_observed_total_count(small_adata):
    """scvi-tools' get_latent_library_size, (n_cells, 1): MrVI's likelihood uses each cell's
    observed total count, so that is what it returns, for any chunking and indices."""
    model = MRVI(small_adata, seed=0)
    model.is_trained = True
    x = small_adata.X.toarray() if scipy.sparse.issparse(small_adata.X) else np.asarray(small_adata.X)
    totals = x.sum(1, dtype=np.float64)[:, None]
    np.testing.assert_array_equal(model.get_latent_library_size(), totals)
    np.testing.assert_array_equal(model.get_latent_library_size(indices=[7, 2], batch_size=1, give_mean=False),
                                  totals[[7, 2]])
    assert model.get_latent_library_size(adata=small_adata[:5].copy()).shape == (5, 1)
    with pytest.raises(ValueError, match="give_mean must be True or False"):
        model.get_latent_library_size(give_mean=None)
