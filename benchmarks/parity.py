"""Is ours the reference's model, objective and optimiser? Both modules in one process, same weights.

``accuracy.py`` compares the two implementations by their results, which vary from seed to seed.
This script compares them by construction: it builds scvi-tools' ``TorchMRVAE`` and our
``MrVIModule`` for the same data, copies the reference's weights into ours (our factorised lifts
take the product of the reference's token lift and its ``nn.MultiheadAttention`` input projection;
architecture 3 keeps both factors, as the reference does) and then

1. **one minibatch, no dropout**: the loss (negative ELBO per cell, at KL weights 0.5 and 1) and
   the gradient of every parameter, with the same draw of ``u`` on both sides (the same seed
   before each side's forward pass; both draw ``u`` with one ``torch.normal`` call of the same
   shape);
2. **analyses**: the reference trained for ``--analysis-epochs`` epochs through its own API and
   its weights copied into an ``MRVI`` of ours: ``get_latent_representation``,
   ``get_local_sample_representation`` and ``get_local_sample_distances`` (per cell, and grouped
   by cell type), compared after aligning their coordinates by name; then, at those trained
   weights, the loss and every gradient on a few minibatches (KL weight 1, our architecture 3,
   :func:`compare_trained_gradients`): the step where training spends its time, not only at
   initialisation;
3. **training steps, dropout on**: both sides take ``--steps`` Adam steps (lr 2e-3, eps 1e-8,
   weight decay 1e-8, gradient-norm clip 40, the KL weight rising as in a 20-epoch warm-up) on
   the same minibatches and the same seeds; each side uses its own code for the step: the
   reference its ``loss`` (as scvi-tools' ``TrainingPlan`` calls it) and ``torch.optim.Adam``, ours
   Pyro's ``Trace_ELBO`` on our model and guide divided by the number of training cells (as
   :func:`mrvi_pyro.train.train_svi` does) and :func:`mrvi_pyro.train.make_adam`.

It prints the relative differences. Float rounding differs (fused against unfused Adam,
factorised against literal attention: gradients agree to ~1e-6), and training amplifies any
difference (Adam's update of a parameter whose gradient is near zero is about ``lr`` times its
sign). So the script also trains a **control**: a copy of the reference whose parameters differ
by ``--control-noise`` (relative, default 1e-6). Ours following the reference as closely as the
control does means the two are the same model, objective and optimiser up to float rounding.

Found with it (stop 25): the one difference in the step is the KL warm-up's first epoch. At KL
weight 0 our model masks the ``u`` and ``z`` sites, so the prior's parameters get no gradient and
Adam skips them; the reference multiplies by 0, so they get a zero gradient plus weight decay,
which Adam normalises into a step of about ``lr * p / (|p| + 1)``: the prior's means shrink by
~0.1 during epoch 0. ``--zero-masked-grads`` gives ours the same zero gradients, after which its
trajectory stays with the reference's as closely as the control's does.

Run it with the reference's Python (scvi-tools installed there; mrvi_pyro is taken from this
checkout)::

    /work/refenv/bin/python benchmarks/parity.py --steps 200
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--n-samples", type=int, default=12)
    parser.add_argument("--n-batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--analysis-epochs", type=int, default=3,
                        help="epochs of the reference trained for the analyses check (0: skip it)")
    parser.add_argument("--control-noise", type=float, default=1e-6,
                        help="relative perturbation of the control's parameters (default 1e-6: about the rounding "
                             "difference between the two sides' gradients)")
    parser.add_argument("--zero-masked-grads", action="store_true",
                        help="ours: give parameters without a gradient (the prior's while the KL weight is 0) a zero "
                             "gradient, so that Adam's weight decay moves them, as the reference's does")
    return parser.parse_args(argv)


def rel(a, b) -> float:
    """Relative difference ``|a - b| / |b|`` of two arrays or tensors, in float64."""
    import numpy as np

    a, b = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def port_weights(ref, ours, architecture: int) -> dict:
    """Copy the reference module's parameters into ours (our names; shapes checked).

    Returns ``{our name: the reference's}`` of the parameters copied as they are (all but the
    lifts of architecture 2, which are products of the reference's)."""
    import torch

    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    done, copied = set(), {}

    def resnet_block(o, r):
        """Our ResnetBlock ``o`` from the reference's ResnetBlock ``r`` (with its skip map, if any)."""
        for x, y in (("fc1", "fc1"), ("norm1", "layer_norm1"), ("fc2", "fc2"), ("norm2", "layer_norm2"),
                     ("fc_match", "fc_match")):
            for k in ("weight", "bias"):
                if f"{o}.{x}.{k}" in our_params:
                    cp(f"{o}.{x}.{k}", f"{r}.{y}.{k}")

    def cp(o, r):
        if our_params[o].shape != ref_params[r].shape:
            raise ValueError(f"{o} {tuple(our_params[o].shape)} vs {r} {tuple(ref_params[r].shape)}")
        our_params[o].data.copy_(ref_params[r].data)
        done.add(o)
        copied[o] = r

    cp("log_theta", "px.px_r")
    cp("u_prior.logits", "u_prior_logits")
    cp("u_prior.means", "u_prior_means")
    cp("u_prior.log_scales", "u_prior_scales")
    for i in range(2):
        for k in ("weight", "bias"):
            cp(f"encoder.linears.{i}.{k}", f"qu.fc{i + 1}.{k}")
        cp(f"encoder.norms.{i}.scale.weight", f"qu.conditional_norm{i + 1}.gamma_embedding.weight")
        cp(f"encoder.norms.{i}.shift.weight", f"qu.conditional_norm{i + 1}.beta_embedding.weight")
        resnet_block(f"encoder.residuals.{i}", f"qu.output_nn.resnet_blocks.{i}")
    cp("encoder.sample_embedding.weight", "qu.sample_embed.weight")
    for k in ("weight", "bias"):
        cp(f"encoder.loc.{k}", f"qu.output_nn.fc_mean.{k}")
        cp(f"encoder.scale.{k}", f"qu.output_nn.fc_scale.0.{k}")

    def attention(o, r):
        cp(f"{o}.query_tokens.weight", f"{r}.query_proj.weight")
        cp(f"{o}.kv_tokens.weight", f"{r}.kv_proj.weight")
        if architecture >= 3:
            cp(f"{o}.query_token.weight", f"{r}.embed_dim_proj_query.weight")
            cp(f"{o}.kv_token.weight", f"{r}.embed_dim_proj_kv.weight")
            cp(f"{o}.in_proj.weight", f"{r}.attention.in_proj_weight")
            cp(f"{o}.in_proj.bias", f"{r}.attention.in_proj_bias")
        else:
            w, b = ref_params[f"{r}.attention.in_proj_weight"], ref_params[f"{r}.attention.in_proj_bias"]
            n = w.shape[1]
            tokens = (ref_params[f"{r}.embed_dim_proj_query.weight"], ref_params[f"{r}.embed_dim_proj_kv.weight"],
                      ref_params[f"{r}.embed_dim_proj_kv.weight"])
            with torch.no_grad():
                for j, (name, token) in enumerate(zip(("q_lift", "k_lift", "v_lift"), tokens)):
                    our_params[f"{o}.{name}.weight"].copy_(w[j * n:(j + 1) * n] @ token)
                    our_params[f"{o}.{name}.bias"].copy_(b[j * n:(j + 1) * n])
                    done.update({f"{o}.{name}.weight", f"{o}.{name}.bias"})
        for k in ("weight", "bias"):
            cp(f"{o}.head_proj.{k}", f"{r}.attention.out_proj.{k}")
        for a, b in (("post", "mlp_eps"), ("residual", "mlp_residual")):
            resnet_block(f"{o}.{a}.block", f"{r}.{b}.resnet_blocks.0")
            for k in ("weight", "bias"):
                cp(f"{o}.{a}.fc.{k}", f"{r}.{b}.fc.{k}")

    cp("sample_mapper.sample_embedding.weight", "qz.embedding.weight")
    for k in ("weight", "bias"):
        cp(f"sample_mapper.query_norm.{k}", f"qz.layer_norm.{k}")
        cp(f"sample_mapper.kv_norm.{k}", f"qz.layer_norm_embed.{k}")
        cp(f"decoder.query_norm.{k}", f"px.layer_norm.{k}")
        cp(f"decoder.kv_norm.{k}", f"px.layer_norm_batch_embed.{k}")
        cp(f"decoder.linear.{k}", f"px.fc.{k}")
        cp(f"z_base_map.{k}", f"qz.fc.{k}")
    cp("decoder.batch_embedding.weight", "px.batch_embedding.weight")
    attention("sample_mapper.attention", "qz.attention_block")
    attention("decoder.nuisance", "px.attention_block")
    missing = set(our_params) - done
    if missing:
        raise ValueError(f"parameters of ours not set from the reference: {sorted(missing)}")
    return copied


def corresponding(architecture: int):
    """(our name, reference name) of parameters that are the same quantity on both sides."""
    pairs = [("log_theta", "px.px_r"), ("u_prior.means", "u_prior_means"),
             ("encoder.linears.0.weight", "qu.fc1.weight"),
             ("encoder.sample_embedding.weight", "qu.sample_embed.weight"),
             ("sample_mapper.sample_embedding.weight", "qz.embedding.weight"),
             ("sample_mapper.attention.residual.fc.weight", "qz.attention_block.mlp_residual.fc.weight"),
             ("sample_mapper.attention.post.block.fc1.weight", "qz.attention_block.mlp_eps.resnet_blocks.0.fc1.weight"),
             ("decoder.linear.weight", "px.fc.weight"), ("decoder.batch_embedding.weight", "px.batch_embedding.weight"),
             ("z_base_map.weight", "qz.fc.weight")]
    if architecture >= 3:
        pairs.append(("sample_mapper.attention.in_proj.weight", "qz.attention_block.attention.in_proj_weight"))
    return pairs


def data_tensors(adata):
    """Counts (float32), sample and batch codes of ``adata`` as tensors (the codes are the
    categories' order, which is also scvi-tools' registry order)."""
    import numpy as np
    import torch

    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return (torch.as_tensor(x, dtype=torch.float32),
            torch.as_tensor(adata.obs["sample"].cat.codes.to_numpy(), dtype=torch.long),
            torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long))


def reference_loss(ref, x, s, b, kl):
    """The reference's loss on one minibatch, as scvi-tools' ``TrainingPlan`` computes it."""
    import torch
    from scvi import REGISTRY_KEYS

    tensors = {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.SAMPLE_KEY: s[:, None].float(),
               REGISTRY_KEYS.BATCH_KEY: b[:, None].float(), REGISTRY_KEYS.LABELS_KEY: torch.zeros(len(x), 1)}
    inference = ref.inference(x, s[:, None])
    generative = ref.generative(inference["z"], inference["library"], b[:, None], torch.zeros(len(x), dtype=torch.long))
    return ref.loss(tensors, inference, generative, kl_weight=kl).loss


def our_loss(ours, x, s, b, idx, n_obs, kl):
    """Our per-cell loss on the minibatch ``idx`` (Pyro's ELBO over ``n_obs`` cells, divided by
    ``n_obs``, as :func:`mrvi_pyro.train.train_svi` hands it to the optimiser)."""
    import pyro
    import torch
    from pyro.infer import Trace_ELBO

    with pyro.validation_enabled(False):
        return Trace_ELBO().differentiable_loss(ours.model, ours.guide, x, s, b, None, n_obs=n_obs,
                                                subsample=torch.as_tensor(idx), kl_weight=kl) / n_obs


def compare_analyses(adata, args) -> None:
    """Train the reference briefly through its API, copy its weights into ours, compare analyses."""
    import logging

    import numpy as np
    from scvi.external import MRVI as ReferenceMRVI

    from mrvi_pyro import MRVI

    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ref_adata, our_adata = adata.copy(), adata.copy()
    ReferenceMRVI.setup_anndata(ref_adata, sample_key="sample", batch_key="batch", backend="torch")
    reference = ReferenceMRVI(ref_adata)
    reference.train(max_epochs=args.analysis_epochs, batch_size=args.batch_size, early_stopping=False,
                    accelerator="cpu", devices=1, enable_progress_bar=False)
    MRVI.setup_anndata(our_adata, sample_key="sample", batch_key="batch")
    ours = MRVI(our_adata)
    port_weights(reference.module, ours.module, ours.module.config["architecture"])
    ours.module.eval()
    ours.is_trained = True

    def aligned(ours_array, ref_array):
        return ours_array.sel({dim: ref_array[dim].values for dim in ref_array.dims if dim in ref_array.coords})

    print(f"analyses (the reference trained {args.analysis_epochs} epochs, its weights in ours), relative "
          "difference ours against the reference:")
    pairs = [("get_latent_representation()", ours.get_latent_representation, reference.get_latent_representation),
             ("get_local_sample_representation()", ours.get_local_sample_representation,
              reference.get_local_sample_representation),
             ("get_local_sample_distances() per cell", lambda: ours.get_local_sample_distances()["cell"],
              lambda: reference.get_local_sample_distances()["cell"]),
             ("get_local_sample_distances(groupby='cell_type')",
              lambda: ours.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"],
              lambda: reference.get_local_sample_distances(groupby="cell_type", keep_cell=False)["cell_type"])]
    for name, of_ours, of_reference in pairs:
        mine, theirs = of_ours(), of_reference()
        if hasattr(theirs, "dims"):
            mine = aligned(mine, theirs).transpose(*theirs.dims)
        print(f"  {name}: {rel(np.asarray(mine), np.asarray(theirs)):.1e}")
    compare_trained_gradients(reference.module, ref_adata, args)


def compare_trained_gradients(ref, ref_adata, args, n_minibatches: int = 4) -> None:
    """The loss and EVERY gradient at the reference's trained weights (KL weight 1), copied into
    our architecture 3 (the reference's parametrisation, so every parameter has a counterpart).

    The step check of :func:`main` starts from the initial weights; this one checks the step
    where training spends its time (learned dispersions, peaked attention, a fitted prior)."""
    import numpy as np
    import torch

    from mrvi_pyro.module import MrVIModule

    ref = ref.cpu().eval()
    x_all, s_all, b_all = data_tensors(ref_adata)
    n, n_genes = x_all.shape
    ours = MrVIModule(n_genes, int(s_all.max()) + 1, int(b_all.max()) + 1, 0, architecture=3).eval()
    mapping = port_weights(ref, ours, 3)
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    worst, rng = {}, np.random.default_rng(args.seed)
    print(f"the step at the reference's trained weights ({args.analysis_epochs} epochs), KL weight 1, "
          f"{len(mapping)} of {len(our_params)} parameters one to one:")
    for trial in range(n_minibatches):
        idx = np.sort(rng.choice(n, args.batch_size, replace=False))
        batch = x_all[idx], s_all[idx], b_all[idx]
        torch.manual_seed(trial)  # the same draw of u on both sides
        theirs = reference_loss(ref, *batch, 1.0)
        ref.zero_grad()
        theirs.backward()
        torch.manual_seed(trial)
        mine = our_loss(ours, *batch, idx, n, 1.0)
        ours.zero_grad()
        mine.backward()
        print(f"  minibatch {trial}: loss {mine.item():.6f} ours, {theirs.item():.6f} the reference")
        for o, r in mapping.items():
            if our_params[o].grad is not None and ref_params[r].grad is not None:
                worst[o] = max(worst.get(o, 0.0), rel(our_params[o].grad, ref_params[r].grad))
    largest = sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    print("  largest relative gradient differences: " + ", ".join(f"{name} {value:.1e}" for name, value in largest))
    print(f"  median over the {len(worst)} parameters: {np.median(list(worst.values())):.1e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from scvi.external.mrvi_torch._module import TorchMRVAE

    from mrvi_pyro.datasets import simulate
    from mrvi_pyro.module import MrVIModule
    from mrvi_pyro.train import make_adam, zero_missing_gradients

    torch.set_num_threads(args.threads)
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, n_samples=args.n_samples,
                     n_batches=args.n_batches, seed=args.seed)
    x_all, sample_all, batch_all = data_tensors(adata)
    n, G = x_all.shape
    S, B = int(sample_all.max()) + 1, int(batch_all.max()) + 1
    print(f"data: {n} cells x {G} genes, {S} samples, {B} batches; torch {torch.__version__}, "
          f"{args.threads} thread(s)")

    def ref_loss(ref, idx, kl):
        return reference_loss(ref, x_all[idx], sample_all[idx], batch_all[idx], kl)

    def ours_loss(ours, idx, kl):
        return our_loss(ours, x_all[idx], sample_all[idx], batch_all[idx], idx, n, kl)

    if args.analysis_epochs:
        compare_analyses(adata, args)

    for architecture in args.architectures:
        torch.manual_seed(args.seed)
        ref = TorchMRVAE(n_input=G, n_sample=S, n_batch=B, n_labels=1)
        ours = MrVIModule(G, S, B, 0, architecture=architecture)
        port_weights(ref, ours, architecture)
        ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
        pairs = corresponding(architecture)
        print(f"\narchitecture {architecture}: {sum(p.numel() for p in our_params.values())} parameters ours, "
              f"{sum(p.numel() for p in ref_params.values())} the reference")

        # 1. one minibatch, no dropout, the same draw of u
        ref.eval()
        ours.eval()
        idx = np.arange(args.batch_size)
        for kl in (0.5, 1.0):
            torch.manual_seed(1)
            lr_ = ref_loss(ref, idx, kl)
            ref.zero_grad()
            lr_.backward()
            torch.manual_seed(1)
            lo = ours_loss(ours, idx, kl)
            ours.zero_grad()
            lo.backward()
            worst = max(rel(our_params[o].grad, ref_params[r].grad) for o, r in pairs)
            print(f"  one minibatch, KL weight {kl}: loss {lo.item():.6f} ours, {lr_.item():.6f} the reference "
                  f"(relative difference {abs(lo.item() - lr_.item()) / abs(lr_.item()):.1e}); largest relative "
                  f"gradient difference over {len(pairs)} parameters {worst:.1e}")

        # 2. training steps with dropout, same minibatches and seeds. The control is a copy of the
        # reference whose parameters differ by a relative --control-noise (float rounding): how fast two runs
        # of the same code separate on their own.
        control = copy.deepcopy(ref)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(args.seed + 1)
            for p in control.parameters():
                p.mul_(1 + args.control_noise * torch.randn(p.shape, generator=generator))
        control_params = dict(control.named_parameters())
        for module in (ref, ours, control):
            module.train()
        optimisers = {
            "reference": torch.optim.Adam(ref.parameters(), lr=2e-3, eps=1e-8, weight_decay=1e-8),
            "ours": make_adam(ours.parameters(), lr=2e-3, eps=1e-8, weight_decay=1e-8),
            "control": torch.optim.Adam(control.parameters(), lr=2e-3, eps=1e-8, weight_decay=1e-8),
        }
        sides = (("reference", ref, ref_loss), ("ours", ours, ours_loss), ("control", control, ref_loss))
        rng = np.random.default_rng(args.seed)
        n_train = int(0.9 * n)
        steps_per_epoch = int(np.ceil(n_train / args.batch_size))
        order = rng.permutation(n_train)
        losses, clipped = {side: [] for side, *_ in sides}, dict.fromkeys(optimisers, 0)
        print(f"  training: {steps_per_epoch} steps per epoch; relative parameter difference to the reference, "
              "largest over the parameters above, ours | the control")
        for step in range(args.steps):
            position = step % steps_per_epoch
            if position == 0 and step:
                order = rng.permutation(n_train)
            idx = order[position * args.batch_size:(position + 1) * args.batch_size]
            kl = min(1.0, (step // steps_per_epoch) / 20)
            for side, module, loss_fn in sides:
                torch.manual_seed(10_000 + step)
                loss = loss_fn(module, idx, kl)
                optimisers[side].zero_grad()
                loss.backward()
                if side == "ours" and args.zero_masked_grads:
                    zero_missing_gradients(module.parameters())
                norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), 40.0)
                clipped[side] += int(norm > 40)
                optimisers[side].step()
                losses[side].append(loss.item())
            if step + 1 in (1, 10, 25, 50, 100, 200, 500, 1000) or step + 1 == args.steps:
                ours_diff = {o: rel(our_params[o].detach(), ref_params[r].detach()) for o, r in pairs}
                control_diff = max(rel(control_params[r].detach(), ref_params[r].detach()) for _, r in pairs)
                top = max(ours_diff, key=ours_diff.get)
                print(f"  after step {step + 1:5d} (KL weight {kl:.2f}): {max(ours_diff.values()):.1e} ({top}) | "
                      f"{control_diff:.1e}; loss {losses['ours'][-1]:.3f} ours, {losses['reference'][-1]:.3f} "
                      f"the reference, {losses['control'][-1]:.3f} the control")
        print("  over {} steps: mean loss {}; clipped steps {}".format(
            args.steps, ", ".join(f"{np.mean(v):.4f} {k}" for k, v in losses.items()),
            ", ".join(f"{v} {k}" for k, v in clipped.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
