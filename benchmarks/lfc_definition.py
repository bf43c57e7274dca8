"""Is a DE-gene gap the trained model or the definition of the LFC? Both models, every definition.

The accuracy benchmark's ``gene_auroc`` ranks genes by the mean |LFC| that each implementation's
own ``differential_expression`` reports. The two implementations define that LFC differently:

- ours regresses each cell's counterfactual ``z`` on the design with an intercept (paired
  posterior draws of ``u``) and decodes at the fitted reference level and reference + beta;
- the reference (scvi-tools 1.4.2, torch) draws ``u`` afresh for every sample, regresses the
  standardised ``z`` without intercept (the design's 0/1 column of a binary covariate, so beta
  is the disease samples' mean minus the mean of all samples), and decodes at
  ``z_base(fresh draw) + mean_s z_s (+ beta)`` in ``compute_h_from_x_eps``: since every ``z_s``
  already holds ``z_base``, that point is about ``2 z_base + mean f``.

This script trains (or loads) one model per side on one cohort and scores the same
planted-gene AUROC (mean |LFC| over the DE cell type's cells of ``--de-cells`` random cells)
with each definition on each side's model, through a small adapter per side (encoder, sample
mapper, ``z_base``, decoder). Definitions:

``own``
    the side's ``differential_expression(store_lfc=True)``;
``reference_algorithm``
    the reference's algorithm as above (unpaired draws, ``z_base`` counted twice);
``paired_twice``
    the same with one draw of ``u`` for all samples;
``paired_at_mean``
    paired draws, decoded at ``mean_s z_s`` and ``mean_s z_s + beta`` (``z_base`` once);
``paired_at_mean_eps1e-3`` / ``eps1e-5``
    the same with the pseudo-count of the log at 1e-3 / 1e-5 instead of 1e-4.

    python benchmarks/lfc_definition.py --simulator programs --seed 1 --n-cells 6000 --workdir /tmp/lfcdef

Prints one row per side with the AUROC of every definition, the mean |LFC| of the planted and
of the other genes, and the share of the sample effects explained by disease and by batch
(:func:`accuracy.label_share` of the counterfactual ``z`` of the DE type's cells).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
DEFINITIONS = ("own", "reference_algorithm", "paired_twice", "paired_at_mean", "paired_at_mean_eps1e-3",
               "paired_at_mean_eps1e-5")


class OursAdapter:
    """The pieces of mrvi_pyro's module that the definitions need."""

    def __init__(self, model):
        self.module = model.module.eval()
        self.samples = [str(s) for s in model.registry.sample_categories]
        self.n_batches = max(1, len(model.registry.batch_categories))

    def posterior(self, x, s):
        loc, scale = self.module.encode_u(x, s)
        return loc, scale

    def z(self, u, s: int):
        import torch

        return self.module.counterfactual_z(u, torch.full(u.shape[:-1], s, dtype=torch.long))

    def z_base(self, u):
        return self.module.z_base(u)

    def h(self, z, b: int):
        import torch

        return self.module.decode(z, torch.full(z.shape[:-1], b, dtype=torch.long)).exp()


class ReferenceAdapter:
    """The same pieces of scvi-tools' torch MRVI module."""

    def __init__(self, model):
        self.module = model.module.eval()
        self.samples = [str(s) for s in model.adata_manager.get_state_registry("sample").categorical_mapping]
        self.n_batches = len(model.adata_manager.get_state_registry("batch").categorical_mapping)

    def posterior(self, x, s):
        qu = self.module.qu(x, s[:, None])
        return qu.loc, qu.scale

    def z(self, u, s: int):
        import torch

        z_base, eps = self.module.qz(u, torch.full((u.shape[0], 1), s, dtype=torch.long))
        return z_base + eps

    def z_base(self, u):
        import torch

        return self.module.qz(u, torch.zeros((u.shape[0], 1), dtype=torch.long))[0]

    def h(self, z, b: int):
        import torch

        n = z.shape[0]
        return self.module.px(z, torch.full((n, 1), b, dtype=torch.long), size_factor=torch.ones(n, 1)).mean


def definition_lfcs(adapter, x, s, design, *, definition: str, draws: int, seed: int):
    """Mean over ``draws`` posterior draws of the (cells, genes) LFC of one definition."""
    import torch

    g = torch.Generator().manual_seed(seed)
    eps_lfc = {"paired_at_mean_eps1e-3": 1e-3, "paired_at_mean_eps1e-5": 1e-5}.get(definition, 1e-4)
    A = torch.linalg.pinv(design.T @ design) @ design.T  # (1, S): no intercept
    with torch.no_grad():
        loc, scale = adapter.posterior(x, s)

        def draw():
            return loc + scale * torch.randn(loc.shape, generator=g)

        total = 0.0
        for _ in range(draws):
            if definition == "reference_algorithm":
                zs = torch.stack([adapter.z(draw(), k) for k in range(len(adapter.samples))], 1)
            else:
                u = draw()
                zs = torch.stack([adapter.z(u, k) for k in range(len(adapter.samples))], 1)
            mean, std = zs.mean(1), zs.std(1)
            standardised = (zs - mean[:, None]) / (1e-6 + std[:, None])
            beta = torch.einsum("ks,nsl->nl", A, standardised) * std
            z0 = mean + (adapter.z_base(draw()) if definition in ("reference_algorithm", "paired_twice") else 0.0)
            lfc = 0.0
            for b in range(adapter.n_batches):
                lfc = lfc + (torch.log2(adapter.h(z0 + beta, b) + eps_lfc)
                             - torch.log2(adapter.h(z0, b) + eps_lfc)) / adapter.n_batches
            total = total + lfc.double()
        return (total / draws).numpy()


def child(args) -> int:
    """Train or load one side's model and score every definition on it."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path[:0] = [str(HERE), str(REPOSITORY)]
    import anndata
    import numpy as np
    import torch

    from _harness import emit_result

    torch.set_num_threads(args.threads)
    adata = anndata.read_h5ad(args.data)
    truth = adata.uns["simulation"]
    if args.side == "ours":
        from mrvi_pyro import MRVI

        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
        if os.path.exists(args.model_dir):
            model = MRVI.load(args.model_dir, adata=adata)
        else:
            model = MRVI(adata, seed=args.seed, **json.loads(args.ours_kwargs))
            model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=0.9, early_stopping=False,
                        seed=args.seed, progress_bar=False)
            model.save(args.model_dir)
        adapter = OursAdapter(model)
    else:
        import logging

        import scvi
        from scvi.external import MRVI

        logging.getLogger("scvi").setLevel(logging.WARNING)
        scvi.settings.seed = args.seed
        MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch", backend="torch")
        if os.path.exists(args.model_dir):
            model = MRVI.load(args.model_dir, adata=adata)
        else:
            model = MRVI(adata)
            model.train(max_epochs=args.epochs, batch_size=args.batch_size, train_size=0.9, early_stopping=False,
                        accelerator="cpu", devices=1, enable_progress_bar=False)
            model.save(args.model_dir)
        adapter = ReferenceAdapter(model)

    import accuracy
    from mrvi_pyro._metrics import auroc

    de_cells = np.sort(np.random.default_rng(args.seed).choice(adata.n_obs, min(args.de_cells, adata.n_obs),
                                                               replace=False))
    in_type = adata.obs["cell_type"].to_numpy()[de_cells] == truth["de_cell_type"]
    cells = de_cells[in_type]
    planted = np.isin(np.asarray(adata.var_names).astype(str), np.asarray(truth["de_genes"]).astype(str))
    per_sample = adata.obs.groupby("sample", observed=True)[["disease", "batch"]].first()
    per_sample.index = per_sample.index.astype(str)
    per_sample = per_sample.reindex(adapter.samples)
    disease = per_sample["disease"].astype(str).to_numpy()
    levels = sorted(set(disease))
    # pandas.get_dummies(drop_first=True), as the reference builds its design: the second level.
    design = torch.as_tensor((disease == levels[1]).astype(np.float32))[:, None]
    counts = adata.X[cells]
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    x = torch.as_tensor(counts, dtype=torch.float32)
    codes = {name: i for i, name in enumerate(adapter.samples)}
    s = torch.as_tensor(adata.obs["sample"].astype(str).map(codes).to_numpy()[cells].astype(np.int64))

    row = {"side": args.side, "n_de_type_cells": int(len(cells))}
    for definition in DEFINITIONS:
        if definition == "own":
            sub = adata[de_cells].copy()
            de = model.differential_expression(adata=sub, sample_cov_keys=["disease"], store_lfc=True,
                                               mc_samples=args.draws)
            names = [str(c) for c in de["covariate"].values]
            column = [c for c in names if c.startswith("disease")][0]
            lfc = de["lfc"].sel(covariate=column).transpose("cell_name", "gene").values[in_type]
        else:
            lfc = definition_lfcs(adapter, x, s, design, definition=definition, draws=args.draws, seed=args.seed)
        mean_abs = np.abs(np.asarray(lfc)).mean(axis=0)
        row[definition] = auroc(planted, mean_abs)
        row[f"{definition}_planted"] = float(mean_abs[planted].mean())
        row[f"{definition}_other"] = float(mean_abs[~planted].mean())
    with torch.no_grad():
        loc, _ = adapter.posterior(x, s)
        local = torch.stack([adapter.z(loc, k) for k in range(len(adapter.samples))], 1).numpy()
    row["disease_in_z"] = accuracy.label_share(local, disease)
    row["batch_in_z"] = accuracy.label_share(local, per_sample["batch"].astype(str).to_numpy())
    emit_result(row)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator", choices=("datasets", "programs"), default="programs")
    parser.add_argument("--preset", choices=("weak", "strong"), default="weak")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n-cells", type=int, default=6000)
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--n-samples", type=int, default=24)
    parser.add_argument("--n-batches", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--de-cells", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--sides", nargs="+", choices=("ours", "reference"), default=["ours", "reference"])
    parser.add_argument("--ours-kwargs", default="{}", help="JSON of extra MRVI(...) arguments for ours")
    parser.add_argument("--reference-python", default="/work/refenv/bin/python")
    parser.add_argument("--workdir", required=True,
                        help="cohort and models go here (reused when present: one model per side and seed)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path[:0] = [str(HERE), str(REPOSITORY)]
    import _harness
    import accuracy

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    size = f"{args.n_cells}x{args.n_genes}x{args.n_samples}s{args.n_batches}b"
    data = workdir / f"{args.simulator}_{args.preset}_seed{args.seed}_{size}.h5ad"
    if not data.exists():  # written once, never replaced
        cohort = accuracy.simulate(args.simulator, args.preset, args.seed, args)
        tmp = data.with_name(data.name + ".tmp")
        cohort.write_h5ad(tmp)
        os.replace(tmp, data)
    rows = []
    for side in args.sides:
        tag = side if side == "reference" or args.ours_kwargs == "{}" else f"ours_{abs(hash(args.ours_kwargs)) % 10**6}"
        model_dir = workdir / f"{data.stem}_{tag}_e{args.epochs}_b{args.batch_size}"
        python = sys.executable if side == "ours" else args.reference_python
        record = _harness.run_script(python, __file__, [
            "--child", "--side", side, "--data", data, "--model-dir", model_dir, "--seed", args.seed,
            "--epochs", args.epochs, "--batch-size", args.batch_size, "--threads", args.threads,
            "--de-cells", args.de_cells, "--draws", args.draws, "--ours-kwargs", args.ours_kwargs,
            "--workdir", workdir], check=True, extra_env={"PYTHONPATH": str(REPOSITORY)})
        rows.append(record["result"])
    columns = ["side", *DEFINITIONS, "disease_in_z", "batch_in_z"]
    print(f"{args.simulator} {args.preset} seed {args.seed}, {args.n_cells} cells, {args.epochs} epochs, "
          f"batch {args.batch_size}: planted-gene AUROC by definition")
    widths = [max(len(c), 9) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        cells = [row["side"]] + [f"{row[c]:.3f}" for c in columns[1:]]
        print("  ".join(v.rjust(w) for v, w in zip(cells, widths)))
    print("mean |LFC| planted / other genes:")
    for row in rows:
        print(f"  {row['side']}: " + ", ".join(
            f"{d} {row[f'{d}_planted']:.4f} / {row[f'{d}_other']:.4f}" for d in DEFINITIONS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
