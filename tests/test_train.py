"""Training: learning planted structure, reproducibility, early stopping, divergence, devices."""


import numpy as np
import pyro
import pytest
import torch

from mrvi_pyro import MRVI, TrainingDivergedError
from mrvi_pyro.module import default_max_epochs
from mrvi_pyro.train import default_lr, resolve_device, sample_balance_weights

from .conftest import knn_accuracy


def test_history_and_validation_elbo_decreases(trained_model):
    history = trained_model.history
    assert list(history.columns) == ["kl_weight", "lr", "elbo_train", "clipped_share", "elbo_validation",
                                     "sample_spread", "batch_share", "batch_share_chance", "seconds"]
    assert len(history) == 60
    # The optimiser sees the per-cell mean loss (the reference's scale): clip_norm=40 is a guard
    # that fires on a minority of steps, not a clip on every step (the full-data scale).
    assert history["clipped_share"].between(0, 1).all()
    assert history["clipped_share"].iloc[10:].mean() < 0.5  # measured 0.19 (full-data scale: 1.0)
    assert history["kl_weight"].iloc[0] == 0 and history["kl_weight"].iloc[-1] == 1
    # after warm-up the validation loss keeps falling, and ends below where it started
    assert history["elbo_validation"].iloc[-1] < history["elbo_validation"].iloc[20]
    assert history["elbo_validation"].iloc[-1] < history["elbo_validation"].iloc[0]
    split = trained_model.training_result
    assert len(split.validation_indices) == 200
    assert len(np.intersect1d(split.train_indices, split.validation_indices)) == 0


def test_u_separates_cell_types_and_mixes_batches(trained_model, sim_adata):
    u = trained_model.get_latent_representation()
    assert knn_accuracy(u, sim_adata.obs["cell_type"].cat.codes.to_numpy()) >= 0.9
    batch = sim_adata.obs["batch"].cat.codes.to_numpy()
    chance = np.bincount(batch).max() / len(batch)
    assert knn_accuracy(u, batch) <= chance + 0.15


def _params(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_same_seed_same_result(small_adata):
    runs, init = [], None
    for seed in (3, 3, 4):
        torch.manual_seed(seed * 100)  # global state differs between runs; training must not depend on it
        model = MRVI(small_adata, n_latent=8, n_latent_u=4)
        init = init or _params(model)
        model.module.load_state_dict(init)
        model.train(max_epochs=3, seed=seed, progress_bar=False)
        runs.append((_params(model), model.history, model.get_latent_representation(use_mean=False, seed=seed)))
    (p1, h1, u1), (p2, h2, u2), (p3, h3, u3) = runs
    for key in p1:
        torch.testing.assert_close(p1[key], p2[key], rtol=0, atol=0)
    np.testing.assert_array_equal(h1["elbo_train"], h2["elbo_train"])
    np.testing.assert_array_equal(u1, u2)
    assert not np.array_equal(h1["elbo_train"], h3["elbo_train"])


def test_default_lr_follows_the_square_root_of_the_batch_size(small_adata):
    assert default_lr(128) == default_lr(32) == 2e-3  # the reference's rate at the default batch size and below
    assert default_lr(256) == pytest.approx(2e-3 * np.sqrt(2)) == default_lr(4096)  # measured up to 256
    assert default_lr(192) == pytest.approx(2e-3 * np.sqrt(1.5))
    runs = {}
    for name, kwargs in (("default", {}), ("explicit", {"lr": default_lr(256)}), ("reference", {"lr": 2e-3}),
                         ("plan", {"plan_kwargs": {"lr": 2e-3}})):
        model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
        model.train(max_epochs=3, batch_size=256, n_epochs_kl_warmup=2, seed=0, progress_bar=False, **kwargs)
        runs[name] = (_params(model), model.history)
    # lr=None: the reference's 2e-3 while the KL weight warms up, then the scaled rate
    assert runs["default"][1]["lr"].tolist() == [2e-3, 2e-3, default_lr(256)]
    assert (runs["explicit"][1]["lr"] == default_lr(256)).all() and (runs["plan"][1]["lr"] == 2e-3).all()
    for key, value in runs["reference"][0].items():
        torch.testing.assert_close(runs["plan"][0][key], value, rtol=0, atol=0)
    for other in ("explicit", "reference"):  # the default is neither constant rate
        assert any(not torch.equal(value, runs[other][0][key]) for key, value in runs["default"][0].items())
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
    model.train(max_epochs=2, batch_size=256, n_epochs_kl_warmup=2, seed=0, progress_bar=False)
    for key, value in _params(model).items():  # two warm-up epochs: exactly lr=2e-3's run
        torch.testing.assert_close(value, _params_after(small_adata, 2e-3)[key], rtol=0, atol=0)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
    model.train(max_epochs=2, batch_size=256, n_epochs_kl_warmup=0, progress_bar=False)  # no warm-up, no switch
    assert (model.history["lr"] == default_lr(256)).all()
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
    model.train(max_epochs=1, progress_bar=False)  # batch 128: the reference's 2e-3
    assert (model.history["lr"] == 2e-3).all()


def _params_after(adata, lr):
    model = MRVI(adata, n_latent=8, n_latent_u=4, seed=0)
    model.train(max_epochs=2, batch_size=256, n_epochs_kl_warmup=2, seed=0, progress_bar=False, lr=lr)
    return _params(model)


def test_training_leaves_global_rng_alone(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.train(max_epochs=1, progress_bar=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_early_stopping(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    result = model.train(max_epochs=50, early_stopping=True, early_stopping_patience=2,
                         early_stopping_min_delta=1e9, progress_bar=False)
    assert result.stopped_early and len(model.history) == 3


def test_divergence_names_the_epoch_and_keeps_finite_parameters(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.train(max_epochs=1, progress_bar=False)
    with torch.no_grad():
        model.module.decoder.linear.bias[3] = float("nan")
    before = _params(model)
    with pytest.raises(TrainingDivergedError, match=r"epoch 0 \(step 0\).*lower learning rate"):
        model.train(max_epochs=2, progress_bar=False)
    after = _params(model)
    for key in before:  # no update was applied with the NaN loss
        torch.testing.assert_close(after[key], before[key], equal_nan=True)


def test_training_variants(small_adata):
    import anndata

    labelled = small_adata.copy()
    MRVI.setup_anndata(labelled, sample_key="sample", batch_key="batch", labels_key="cell_type")
    for adata, options in [
        (small_adata, {"u_prior_mixture": False}),  # fails in the reference
        (labelled, {}),
        (small_adata, {"learn_z_u_prior_scale": True, "scale_observations": True}),
        (small_adata, {"qz_kwargs": {"use_map": False}}),
    ]:
        model = MRVI(adata, n_latent=8, n_latent_u=4, **options)
        model.train(max_epochs=2, progress_bar=False)
        assert np.isfinite(model.history["elbo_validation"]).all()
    assert isinstance(labelled, anndata.AnnData)


def test_sample_balance_weights():
    samples = np.array([0, 0, 0, 1, 2, 2])
    w = sample_balance_weights(samples, 4)
    assert w.sum() == pytest.approx(6)
    assert w[:3].sum() == pytest.approx(w[3]) == pytest.approx(w[4:].sum())


def test_devices_and_arguments(small_adata):
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("tpu")
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    with pytest.raises(ValueError, match="train_size"):
        model.train(max_epochs=1, train_size=1.5)
    assert default_max_epochs(20000) == 400 and default_max_epochs(200_000) == 40


def test_train_size_one_monitors_training_loss(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.train(max_epochs=1, train_size=1.0, progress_bar=False)
    assert "elbo_validation" not in model.history


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.train(max_epochs=1, device="cuda", progress_bar=False)
    assert next(model.module.parameters()).is_cuda
    assert model.get_latent_representation().shape == (small_adata.n_obs, 4)


def test_seeded_initialisation(small_adata):
    a = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=5)
    b = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=5)
    c = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=6)
    for key, value in a.module.state_dict().items():
        torch.testing.assert_close(b.module.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(a.module.encoder.loc.weight, c.module.encoder.loc.weight)


def test_parameters_without_a_gradient_are_not_stepped(small_adata):
    """torch's Adam skips a parameter without a gradient: with ``warmup_zero_grads=False`` the
    prior's parameters, masked out while the KL weight is 0 (first warm-up epoch), keep their
    values even under weight decay."""
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    before = _params(model)
    model.train(max_epochs=1, n_epochs_kl_warmup=20, weight_decay=1e-2, warmup_zero_grads=False, progress_bar=False)
    after = _params(model)
    for key in ("u_prior.logits", "u_prior.means", "u_prior.log_scales"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert not torch.equal(after["encoder.loc.weight"], before["encoder.loc.weight"])


def test_warmup_zero_grads_steps_the_prior_in_the_first_warmup_epoch(small_adata):
    """``warmup_zero_grads=True`` (scvi-tools' behaviour): during the epoch at KL weight 0 the
    prior's parameters get zero gradients, so weight decay pulls their non-zero values towards 0
    and zeros stay put; the other parameters are trained as without it (up to rounding: the
    clipped gradient norm then sums over the zero gradients too)."""
    runs = {}
    for zero in (False, True, "default"):
        model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
        before = _params(model)
        option = {} if zero == "default" else {"warmup_zero_grads": zero}
        model.train(max_epochs=1, n_epochs_kl_warmup=20, weight_decay=1e-2, progress_bar=False, **option)
        runs[zero] = _params(model)
    for key, value in runs[False].items():  # the default skips them (README "Differences from scvi-tools")
        torch.testing.assert_close(runs["default"][key], value, rtol=0, atol=0, msg=key)
    means_before, means_after = before["u_prior.means"], runs[True]["u_prior.means"]
    assert (means_after.abs() < means_before.abs()).all()  # every mean pulled towards 0
    assert (torch.sign(means_after) == torch.sign(means_before)).all()
    for key in ("u_prior.logits", "u_prior.log_scales"):  # start at 0: a zero gradient plus decay of 0
        torch.testing.assert_close(runs[True][key], before[key], rtol=0, atol=0)
    torch.testing.assert_close(runs[False]["u_prior.means"], means_before, rtol=0, atol=0)
    for key, value in runs[False].items():
        if not key.startswith("u_prior.") and key != "z_u_log_scale":
            torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_warmup_zero_grads_equals_zero_gradients_for_every_missing_one(small_adata, monkeypatch):
    """Over a warm-up of several epochs the option equals giving every parameter without a
    gradient a zero one at every step (what the KL terms multiplied by their weight do in
    scvi-tools): only the epoch at weight 0 lacks gradients, and no parameter lacks one later."""
    from mrvi_pyro import train as train_module

    def run(zero):
        model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=1)
        model.train(max_epochs=3, n_epochs_kl_warmup=2, batch_size=256, warmup_zero_grads=zero, progress_bar=False)
        return _params(model)

    with_option = run(True)
    plain_clip = torch.nn.utils.clip_grad_norm_

    def filling_clip(params, *args, **kwargs):  # the step after backward() in every epoch
        params = list(params)
        train_module.zero_missing_gradients(params)
        return plain_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", filling_clip)
    filled = run(False)
    for key, value in filled.items():
        torch.testing.assert_close(with_option[key], value, rtol=0, atol=0, msg=key)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", plain_clip)
    assert not torch.equal(run(False)["u_prior.means"], with_option["u_prior.means"])


def test_warmup_zero_grads_must_be_a_bool(small_adata):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    with pytest.raises(ValueError, match="warmup_zero_grads must be True or False; got 'yes'"):
        model.train(max_epochs=1, warmup_zero_grads="yes", progress_bar=False)
    assert not model.is_trained


def test_malloc_tuning_applies_once_and_can_be_turned_off():
    import subprocess
    import sys

    code = "from mrvi_pyro._malloc import tune_malloc; print(tune_malloc(), tune_malloc())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "MRVI_PYRO_TUNE_MALLOC": "0"})
    assert off.stdout.split() == ["False", "False"]
    if sys.platform.startswith("linux"):
        assert on.stdout.split() == ["True", "True"]


def test_malloc_tuning_is_opt_in_for_library_calls():
    """Training and analyses leave a user's process allocator alone unless settings.tune_malloc."""
    import os
    import subprocess
    import sys

    code = (
        "import mrvi_pyro; from mrvi_pyro import MRVI, _malloc\n"
        "a = mrvi_pyro.datasets.simulate(n_cells=120, n_genes=40, n_samples=4, seed=0, n_de_genes=5, n_group_genes=5)\n"
        "MRVI.setup_anndata(a, sample_key='sample', batch_key='batch')\n"
        "m = MRVI(a, n_latent=4, n_latent_u=2); m.train(max_epochs=1, progress_bar=False)\n"
        "m.get_latent_representation(); print(_malloc._MALLOC_TUNED)\n"
        "mrvi_pyro.settings.tune_malloc = True; m.get_latent_representation(); print(_malloc._MALLOC_TUNED)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MRVI_PYRO_TUNE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    lines = out.stdout.split("\n")
    assert lines[0] == "[]"  # never called by default
    assert lines[1] == ("[True]" if sys.platform.startswith("linux") else "[False]")
    cli = ("from mrvi_pyro import cli, _malloc\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
           "print(_malloc._MALLOC_TUNED)")
    out = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split("\n")[-2] == ("[True]" if sys.platform.startswith("linux") else "[False]")  # CLI: on
    import mrvi_pyro

    with pytest.raises(TypeError, match="tune_malloc must be True or False"):
        mrvi_pyro.settings.tune_malloc = "yes"


def _guide_with_pyro_param(module, x, sample_index, batch_index, label_index=None, *, n_obs=None, subsample=None,
                           kl_weight=1.0, cell_scale=None):
    """The MrVI guide with a global learnable scale on u kept in Pyro's param store."""
    from pyro import distributions as dist

    from mrvi_pyro.model import cells_plate, kl_scale

    log_scale = pyro.param("u_extra_log_scale", torch.zeros(module.config["n_latent_u"]))
    with cells_plate(x, n_obs, subsample, cell_scale), kl_scale(kl_weight):
        loc, scale = module.encode_u(x, sample_index)
        u = pyro.sample("u", dist.Normal(loc, scale * log_scale.exp()).to_event(1))
        pyro.sample("z", dist.Delta(module.counterfactual_z(u, sample_index), event_dim=1))


def test_parameters_outside_the_module_are_refused(small_adata):
    """A pyro.param in the guide would never be optimised: training refuses it before any step."""
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, guide=_guide_with_pyro_param)
    before = _params(model)
    with pytest.raises(ValueError, match=r"the guide creates \['u_extra_log_scale'\].*nn\.Parameter"):
        model.train(max_epochs=1, progress_bar=False)
    for key, value in before.items():
        torch.testing.assert_close(model.module.state_dict()[key], value, rtol=0, atol=0)
    assert not model.is_trained


def test_module_parameters_used_by_the_guide_are_owned_and_trained(small_adata):
    """The remedy the error names: a subclass owns the parameter, so it is optimised. Parameter
    sites of module parameters (``pyro.module``, PyroModule attributes) are accepted."""
    from pyro import distributions as dist

    from mrvi_pyro import MrVIModule
    from mrvi_pyro.data import CellData, get_registry
    from mrvi_pyro.model import cells_plate, kl_scale
    from mrvi_pyro.train import train_svi

    class ScaledU(MrVIModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.u_extra_log_scale = torch.nn.Parameter(torch.zeros(self.config["n_latent_u"]))

    def guide(module, x, sample_index, batch_index, label_index=None, *, n_obs=None, subsample=None,
              kl_weight=1.0, cell_scale=None):
        pyro.module("mrvi", module)  # param sites, all owned by the module
        with cells_plate(x, n_obs, subsample, cell_scale), kl_scale(kl_weight):
            loc, scale = module.encode_u(x, sample_index)
            u = pyro.sample("u", dist.Normal(loc, scale * module.u_extra_log_scale.exp()).to_event(1))
            pyro.sample("z", dist.Delta(module.counterfactual_z(u, sample_index), event_dim=1))

    torch.manual_seed(0)
    module = ScaledU(small_adata.n_vars, 6, 2, n_latent=8, n_latent_u=4, guide=guide)
    train_svi(module, CellData(small_adata, get_registry(small_adata)), max_epochs=2, progress_bar=False)
    assert "mrvi$$$u_extra_log_scale" in dict(pyro.get_param_store().named_parameters())
    assert module.u_extra_log_scale.abs().max() > 0  # optimised


def _trained_with_and_without(small_adata, monkeypatch, name: str, max_epochs: int):
    """Two models trained alike, the second with ``mrvi_pyro.train.<name>`` replaced by a no-op;
    asserts their parameters are bit-equal and returns both."""
    from mrvi_pyro import train as train_module

    models = []
    for replaced in (False, True):
        if replaced:
            monkeypatch.setattr(train_module, name, lambda *args: None)
        model = MRVI(small_adata, n_latent=8, n_latent_u=4)
        model.train(max_epochs=max_epochs, progress_bar=False)
        models.append(model)
    for key, value in _params(models[0]).items():
        torch.testing.assert_close(_params(models[1])[key], value, rtol=0, atol=0)
    return models


def test_ownership_check_leaves_training_unchanged(small_adata, monkeypatch):
    _trained_with_and_without(small_adata, monkeypatch, "check_parameters_owned", max_epochs=2)


def test_sample_spread_is_the_rms_distance_between_two_samples(small_adata):
    from mrvi_pyro.train import sample_spread

    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.train(max_epochs=2, progress_bar=False)
    data = model._cell_data(purpose="training")
    cells = np.arange(40)
    (batch,) = list(data.read_ahead([cells]))
    module = model.module
    module.eval()
    with torch.no_grad():
        u = module.encode_u(batch["x"], batch["sample_index"])[0]
        n_samples = small_adata.obs["sample"].nunique()
        # literal: every ordered pair of distinct samples, one cell at a time
        per_cell = []
        for c in range(len(cells)):
            zs = [module.counterfactual_z(u[c : c + 1], torch.tensor([s]))[0] for s in range(n_samples)]
            pairs = [(a, b) for a in range(n_samples) for b in range(n_samples) if a != b]
            squared = [float(((zs[a] - zs[b]) ** 2).sum()) for a, b in pairs]
            per_cell.append(np.sqrt(np.mean(squared)))
    module.train()
    assert sample_spread(module, batch) == pytest.approx(np.mean(per_cell), rel=1e-5)
    assert module.training  # the mode is restored
    assert model.history["sample_spread"].gt(0).all() and model.history["sample_spread"].notna().all()


def test_spread_measurement_leaves_training_unchanged(small_adata, monkeypatch):
    measured, unmeasured = _trained_with_and_without(small_adata, monkeypatch, "probe_counterfactuals", max_epochs=3)
    np.testing.assert_array_equal(measured.history["elbo_validation"], unmeasured.history["elbo_validation"])
    for column in ("sample_spread", "batch_share"):  # both come from the one probe pass
        assert column in measured.history and column not in unmeasured.history


def test_batch_share_is_what_get_sample_effect_shares_reports(small_adata):
    from mrvi_pyro.explore import centred_projection
    from mrvi_pyro.train import sample_batch_composition, sample_batch_share

    model = MRVI(small_adata, n_latent=8, n_latent_u=4, seed=0)
    model.train(max_epochs=3, progress_bar=False)
    history = model.history
    assert history["batch_share"].between(0, 1).all() and history["batch_share"].notna().all()
    n_batches, n_samples = small_adata.obs["batch"].nunique(), small_adata.obs["sample"].nunique()
    assert (history["batch_share_chance"] == (n_batches - 1) / (n_samples - 1)).all()  # each sample in one batch
    data = model._cell_data(purpose="training")
    cells = np.arange(0, small_adata.n_obs, 3)
    (batch,) = list(data.read_ahead([cells]))
    composition = sample_batch_composition(data)
    np.testing.assert_allclose(composition.sum(1), 1.0)
    share = sample_batch_share(model.module, batch, torch.as_tensor(centred_projection(composition)))
    expected = model.get_sample_effect_shares(indices=cells).set_index("covariate").loc["batch", "share"]
    assert share == pytest.approx(expected, rel=1e-4)
    no_batch = small_adata.copy()
    MRVI.setup_anndata(no_batch, sample_key="sample")
    unbatched = MRVI(no_batch, n_latent=8, n_latent_u=4, seed=0)
    unbatched.train(max_epochs=1, progress_bar=False)
    assert "batch_share" not in unbatched.history and "sample_spread" in unbatched.history


def test_batch_share_measurement_leaves_training_unchanged(small_adata, monkeypatch):
    measured, unmeasured = _trained_with_and_without(small_adata, monkeypatch, "sample_batch_share", max_epochs=3)
    np.testing.assert_array_equal(measured.history["elbo_validation"], unmeasured.history["elbo_validation"])
    assert "batch_share" in measured.history and "batch_share" not in unmeasured.history


def test_spread_still_growing_compares_the_last_two_windows():
    import pandas as pd

    from mrvi_pyro.train import spread_still_growing

    def history(values):
        return pd.DataFrame({"sample_spread": values})

    rng = np.random.default_rng(0)
    flat = 0.4 * (1 + 0.05 * rng.standard_normal(100))  # settled, 5% noise from epoch to epoch
    assert spread_still_growing(history(flat)) is None
    rising = np.concatenate([np.full(80, 0.1), np.linspace(0.1, 0.4, 20)])  # a late escape
    growth, window = spread_still_growing(history(rising))
    assert window == 10  # a tenth of 100 epochs
    assert growth == pytest.approx(np.linspace(0.1, 0.4, 20)[10:].mean() / np.linspace(0.1, 0.4, 20)[:10].mean() - 1)
    assert spread_still_growing(history(rising[:9])) is None  # shorter than two windows of 5
    assert spread_still_growing(history(rising[::-1])) is None  # shrinking is not growing
    assert spread_still_growing(pd.DataFrame({"elbo_train": rising})) is None


def test_train_warns_while_sample_effects_still_grow(small_adata, monkeypatch):
    from mrvi_pyro import train as train_module

    calls = []

    def growing(module, batch, z=None):
        calls.append(1)
        return 0.1 * 1.1 ** len(calls)

    monkeypatch.setattr(train_module, "sample_spread", growing)
    monkeypatch.setattr(train_module, "sample_batch_share", lambda module, batch, projection, z=None: 0.2)  # flat
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    with pytest.warns(UserWarning, match=r"still growing.*over the last 5 epochs.*larger max_epochs"):
        model.train(max_epochs=10, progress_bar=False)
    monkeypatch.setattr(train_module, "sample_spread", lambda module, batch, z=None: 0.3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MRVI(small_adata, n_latent=8, n_latent_u=4).train(max_epochs=10, progress_bar=False)


def test_batch_share_still_falling_needs_a_high_falling_share():
    import pandas as pd

    from mrvi_pyro.train import batch_share_still_falling

    def history(values, chance=0.1):
        return pd.DataFrame({"batch_share": values, "batch_share_chance": chance})

    detour = np.concatenate([np.full(40, 1.0), np.linspace(1.0, 0.2, 60)])  # leaving late (weak seed 4 at 12k cells)
    last, before, chance, window = batch_share_still_falling(history(detour))
    assert window == 10 and chance == 0.1
    assert last == pytest.approx(detour[-10:].mean()) and before == pytest.approx(detour[-20:-10].mean())
    assert batch_share_still_falling(history(np.concatenate([detour, np.full(100, 0.1)]))) is None  # settled at chance
    assert batch_share_still_falling(history(np.full(100, 0.8))) is None  # high and flat: confounded design
    assert batch_share_still_falling(history(np.linspace(0.3, 0.15, 100))) is None  # falling but < 2x chance
    assert batch_share_still_falling(history(detour[::-1])) is None  # rising is not falling
    assert batch_share_still_falling(history(detour[:9])) is None  # shorter than two windows of 5
    assert batch_share_still_falling(pd.DataFrame({"batch_share": detour})) is None  # no chance column


def test_train_warns_while_batch_still_leaves_the_sample_effects(small_adata, monkeypatch):
    from mrvi_pyro import train as train_module

    calls = []

    def leaving(module, batch, projection, z=None):
        calls.append(1)
        return 0.95 ** len(calls)

    monkeypatch.setattr(train_module, "sample_batch_share", leaving)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    with pytest.warns(UserWarning, match=r"still follow batch.*last 5 epochs.*larger max_epochs"):
        model.train(max_epochs=10, progress_bar=False)
    monkeypatch.setattr(train_module, "sample_batch_share", lambda module, batch, projection, z=None: 0.9)  # high, flat
    monkeypatch.setattr(train_module, "sample_spread", lambda module, batch, z=None: 0.3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MRVI(small_adata, n_latent=8, n_latent_u=4).train(max_epochs=10, progress_bar=False)


def test_spread_probe_spans_the_validation_cells(monkeypatch):
    """The probe cells are spread over the whole validation set: on data ordered by sample, the
    first 256 validation cells would come from the first samples only."""
    import mrvi_pyro
    from mrvi_pyro import train as train_module

    adata = mrvi_pyro.datasets.simulate(n_cells=1200, n_genes=60, n_samples=6, seed=2, n_de_genes=10, n_group_genes=10)
    adata = adata[adata.obs.sort_values("sample", kind="stable").index].copy()
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    seen = []
    monkeypatch.setattr(train_module, "probe_counterfactuals", lambda module, batch: seen.append(batch["sample_index"]))
    model = MRVI(adata, n_latent=8, n_latent_u=4)
    model.train(max_epochs=1, train_size=0.5, progress_bar=False)
    (probe,) = seen
    assert len(probe) == 256
    codes = np.bincount(probe.numpy(), minlength=6)
    assert (codes > 0).all(), codes  # every sample of the validation set, each about 256 / 6 cells
    assert codes.min() >= 25, codes
