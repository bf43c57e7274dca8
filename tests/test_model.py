"""The Pyro programs: site shapes, minibatch scaling, KL warm-up and rendering."""

import numpy as np
import pyro
import pytest
import torch
from pyro import distributions as dist
from pyro import poutine

from mrvi_pyro import MrVIModule, guide, model
from mrvi_pyro.model import cells_plate, kl_scale


def _toy(n=40, g=30, s=4, b=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, g, generator=gen) * 4, generator=gen) + (torch.arange(g) == 0).float()
    return x, torch.randint(0, s, (n,), generator=gen), torch.randint(0, b, (n,), generator=gen)


def _traces(module, *args, **kwargs):
    guide_trace = poutine.trace(module.guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return model_trace, guide_trace


@pytest.mark.parametrize("n_labels", [0, 3])
def test_site_shapes(n_labels):
    torch.manual_seed(0)
    module = MrVIModule(30, 4, 2, n_labels=n_labels, n_latent=12, n_latent_u=5).eval()
    x, s, b = _toy()
    labels = torch.randint(0, 3, (40,)) if n_labels else None
    model_trace, guide_trace = _traces(module, x, s, b, labels)
    expected = {"u": (40, 5), "z": (40, 12), "x": (40, 30)}
    for name, shape in expected.items():
        assert model_trace.nodes[name]["value"].shape == shape
        assert model_trace.nodes[name]["log_prob"].shape == (40,)
    assert model_trace.nodes["x"]["is_observed"]
    assert set(guide_trace.stochastic_nodes) - {"cells"} == {"u", "z"}
    assert guide_trace.nodes["u"]["log_prob"].shape == (40,)
    # z is a deterministic (Delta) function of u and the sample in the guide
    z = guide_trace.nodes["z"]["value"]
    torch.testing.assert_close(z, module.counterfactual_z(guide_trace.nodes["u"]["value"], s))


def test_programs_share_one_signature():
    import inspect

    assert inspect.signature(model).parameters.keys() == inspect.signature(guide).parameters.keys()


def _fixed_noise_guide(noise):
    """The MrVI guide with fixed per-cell noise for u (so minibatch estimates differ only by
    which cells are drawn)."""

    def fixed_guide(module, x, s, b, labels=None, *, n_obs=None, subsample=None, kl_weight=1.0, cell_scale=None):
        with cells_plate(x, n_obs, subsample, cell_scale), kl_scale(kl_weight):
            loc, scale = module.encode_u(x, s)
            u = loc + scale * noise[subsample]
            log_q = dist.Normal(loc, scale).log_prob(u).sum(-1)
            pyro.sample("u", dist.Delta(u, log_density=log_q, event_dim=1))
            pyro.sample("z", dist.Delta(module.counterfactual_z(u, s), event_dim=1))

    return fixed_guide


def test_minibatch_elbo_is_unbiased():
    torch.manual_seed(0)
    n = 120
    module = MrVIModule(30, 4, 2, n_latent=8, n_latent_u=4).eval()
    x, s, b = _toy(n=n)
    noise = torch.randn(n, 4)
    fixed_guide = _fixed_noise_guide(noise)
    elbo = pyro.infer.Trace_ELBO()

    def loss(idx, kl_weight=0.7):
        with torch.no_grad():
            return float(elbo.differentiable_loss(
                module.model, lambda *a, **k: fixed_guide(module, *a, **k), x[idx], s[idx], b[idx],
                n_obs=n, subsample=idx, kl_weight=kl_weight,
            ))

    full = loss(torch.arange(n))
    # A partition into equal minibatches averages to the full-data ELBO exactly.
    perm = torch.randperm(n)
    partition = [loss(perm[i : i + 30]) for i in range(0, n, 30)]
    assert np.mean(partition) == pytest.approx(full, rel=1e-5)
    # Random minibatches average to it within Monte Carlo error.
    rng = np.random.default_rng(0)
    estimates = np.array([loss(torch.as_tensor(rng.choice(n, 20, replace=False))) for _ in range(150)])
    standard_error = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean() - full) < 4 * standard_error
    # and a single minibatch is not trivially equal to it (the test has power)
    assert estimates.std() > 0.01 * abs(full)


def test_kl_warmup_scales_latent_terms():
    torch.manual_seed(0)
    module = MrVIModule(30, 4, 2, n_latent=8, n_latent_u=4).eval()
    x, s, b = _toy()
    with torch.no_grad():
        lp = {}
        for w in (0.0, 0.5, 1.0):
            pyro.set_rng_seed(1)
            model_trace, guide_trace = _traces(module, x, s, b, kl_weight=w)
            lp[w] = (model_trace.nodes["u"]["log_prob_sum"], guide_trace.nodes["u"]["log_prob_sum"],
                     model_trace.nodes["x"]["log_prob_sum"])
    assert lp[0.0][0] == 0 and lp[0.0][1] == 0  # masked
    torch.testing.assert_close(lp[0.5][0], 0.5 * lp[1.0][0])
    torch.testing.assert_close(lp[0.5][1], 0.5 * lp[1.0][1])
    torch.testing.assert_close(lp[0.5][2], lp[1.0][2])  # likelihood untouched


def test_z_u_prior_false_drops_the_term():
    module = MrVIModule(30, 4, 2, n_latent=8, n_latent_u=4, z_u_prior=False).eval()
    x, s, b = _toy()
    model_trace, _ = _traces(module, x, s, b)
    assert model_trace.nodes["z"]["log_prob_sum"] == 0


def test_learned_z_u_scale_is_a_parameter():
    module = MrVIModule(30, 4, 2, learn_z_u_prior_scale=True)
    assert "z_u_log_scale" in dict(module.named_parameters())
    assert "z_u_log_scale" not in dict(MrVIModule(30, 4, 2).named_parameters())


def test_render_model_draws_the_graph():
    module = MrVIModule(30, 4, 2, n_latent=8, n_latent_u=4)
    x, s, b = _toy()
    graph = pyro.render_model(module.model, model_args=(x, s, b))
    source = graph.source
    for name in ("cells", "u", "z", "x"):
        assert name in source
    assert "u -> z" in source and "z -> x" in source


def test_block_options_are_validated():
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['bogus'\] in qz_kwargs. Allowed keys"):
        MrVIModule(30, 4, 2, qz_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match="px_kwargs"):
        MrVIModule(30, 4, 2, px_kwargs={"use_map": True})
    with pytest.raises(ValueError, match="likelihood"):
        MrVIModule(30, 4, 2, likelihood="zinb")


@pytest.mark.parametrize("options", [
    {"qz_kwargs": {"use_map": False}},
    {"px_kwargs": {"low_dim_batch": False}},
    {"qz_kwargs": {"stop_gradients": True, "stop_gradients_mlp": False}, "px_kwargs": {"stop_gradients": True}},
    {"u_prior_mixture": False},
    {"likelihood": "poisson"},
    {"n_latent": 4, "n_latent_u": 4},
])
def test_variants_give_finite_differentiable_loss(options):
    torch.manual_seed(0)
    module = MrVIModule(30, 4, 2, **{"n_latent": 8, "n_latent_u": 4, **options})
    x, s, b = _toy()
    loss = pyro.infer.Trace_ELBO().differentiable_loss(module.model, module.guide, x, s, b)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_single_batch_decoder_has_no_nuisance_block():
    module = MrVIModule(30, 4, 1, n_latent=8, n_latent_u=4)
    assert not hasattr(module.decoder, "nuisance")
    x, s, _ = _toy()
    b = torch.zeros(40, dtype=torch.long)
    assert torch.isfinite(pyro.infer.Trace_ELBO().differentiable_loss(module.model, module.guide, x, s, b))
