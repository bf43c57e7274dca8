"""Reference timings for scvi-tools' MRVI (``scvi.external.MRVI``, scvi-tools 1.4.x).

Runs ONE step of the reference implementation on an .h5ad written by the mrvi_pyro simulator
(obs: "sample", "batch", "cell_type", "disease" (categorical), "age"; X = raw counts) and prints
one ``RESULT {json}`` line.  Peak RSS is measured from outside by ``benchmarks/_harness.py``
(``run_command``), so start this script through the harness for memory numbers.

Must run in the separate scvi-tools venv (NOT the project venv)::

    /work/bench-venv/bin/python benchmarks/reference_mrvi.py --data X.h5ad --task train \
        --batch-size 256 --max-epochs 3
    /work/bench-venv/bin/python benchmarks/reference_mrvi.py --data X.h5ad --task distances
    /work/bench-venv/bin/python benchmarks/reference_mrvi.py --data X.h5ad --task de --mc-samples 50
    /work/bench-venv/bin/python benchmarks/reference_mrvi.py --data X.h5ad --task de --no-lfc
    /work/bench-venv/bin/python benchmarks/reference_mrvi.py --data X.h5ad --task da

Tasks
-----
train      ``model.train(max_epochs=E, batch_size=B, train_size=1.0, early_stopping=False,
           check_val_every_n_epoch=None, enable_progress_bar=False)``; timed around ``train()``
           only (model construction excluded).  ``cells_per_s = n_train_cells * epochs /
           seconds``.  Per-epoch wall times (Lightning callback) are also reported, and
           ``steady_cells_per_s`` excludes the first epoch when E > 1.
distances  train E (default 1) epochs untimed, then time
           ``model.get_local_sample_distances(groupby="cell_type", keep_cell=False)``.
de         train untimed, then time ``model.differential_expression(sample_cov_keys=["disease"],
           store_lfc=True, mc_samples=N)`` (``--no-lfc`` -> ``store_lfc=False``).
da         train untimed, then time ``model.differential_abundance(sample_cov_keys=["disease"])``.

``--save-model DIR`` trains and saves the model, then stops (no analysis step);
``--load-model DIR`` loads it (``MRVI.load(DIR, adata=adata)``) instead of constructing and
training, so an analysis step can be measured in a process that never trained.

Notes on scvi-tools 1.4.2's ``TorchMRVI.train``: explicit arguments override MRVI's
``DEFAULT_TRAIN_KWARGS`` (max_epochs=100, early_stopping=True, train_size=0.9, batch_size=256,
check_val_every_n_epoch=1), and the signature defaults (batch_size=128, early_stopping=False,
train_size=None -> 0.9 split) are always passed, so the *effective* defaults of a bare
``model.train()`` are batch_size=128, no early stopping, 90/10 split, validation every epoch.
This script passes everything explicitly.  Caveat: ``train_size=1.0`` *requires*
``check_val_every_n_epoch=None`` (MRVI's default of 1 makes Lightning fail with "An invalid
dataloader was returned from `DataSplitter.val_dataloader()`. Found None.").

Timing advice (2-core machine): pass ``--threads 1`` (and the same to the Pyro side) when
anything else may be running.  With torch's default 2 intra-op threads, any concurrent CPU load
makes timings 10-50x slower and erratic (OpenMP threads fight for the cores); with 1 thread they
stay stable.  The first training epoch carries one-off set-up cost, hence
``steady_cells_per_s``.  Peak RSS of ``de`` scales with ``--eval-batch-size`` (batch x n_samples
x mc_samples rows go through the counterfactual encoder at once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

TASKS = ("train", "distances", "de", "da")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="input .h5ad (raw counts in X)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--batch-size", type=int, default=128,
                   help="training minibatch size (default 128 = effective MRVI.train default)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs to train (default: 3 for --task train, 1 otherwise)")
    p.add_argument("--train-size", type=float, default=1.0,
                   help="fraction of cells used for training (default 1.0: no validation set)")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="batch_size for distances/de/da (default: each method's own default: "
                        "256 / 128 / 128)")
    p.add_argument("--mc-samples", type=int, default=50, help="DE mc_samples (default 50)")
    p.add_argument("--no-lfc", action="store_true", help="DE with store_lfc=False")
    p.add_argument("--sample-cov", default="disease",
                   help="sample covariate for de/da (default: disease)")
    p.add_argument("--groupby", default="cell_type", help="groupby key for distances")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="MRVI backend (jax needs scvi-tools[jax]; not installed by default)")
    p.add_argument("--accelerator", default="cpu", help="lightning accelerator (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="distances/de/da: time the call this many times; 'seconds' is the "
                        "minimum, 'seconds_all' lists all (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", default=None,
                   help="after training, save the model to this directory and stop (no analysis step)")
    p.add_argument("--load-model", default=None,
                   help="load a model saved with --save-model instead of constructing and training one")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--model-kwargs", default="{}",
                   help='JSON dict passed to MRVI(adata, **kw) (default {}: default architecture)')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    max_epochs = args.max_epochs if args.max_epochs is not None else (
        3 if args.task == "train" else 1)

    # tqdm honours TQDM_DISABLE only if set before tqdm is imported.
    if not args.progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _harness import emit_result

    t_import = time.perf_counter()
    import logging

    import anndata as ad
    import numpy as np
    import scvi
    import torch
    from scvi.external import MRVI
    import_seconds = time.perf_counter() - t_import

    logging.getLogger("scvi").setLevel(logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = args.seed
    if args.threads:
        torch.set_num_threads(args.threads)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    base = {
        "task": args.task,
        "implementation": "scvi-tools MRVI",
        "scvi_version": scvi.__version__,
        "torch_version": torch.__version__,
        "backend": args.backend,
        "accelerator": args.accelerator,
        "torch_threads": torch.get_num_threads(),
        "data": os.path.abspath(args.data),
        "batch_size": args.batch_size,
        "max_epochs": max_epochs,
        "import_seconds": import_seconds,
    }

    t0 = time.perf_counter()
    adata = ad.read_h5ad(args.data)
    base["load_seconds"] = time.perf_counter() - t0
    base.update(n_cells=int(adata.n_obs), n_genes=int(adata.n_vars),
                n_samples=int(adata.obs["sample"].nunique()),
                n_batches=int(adata.obs["batch"].nunique()))

    if args.load_model:
        t0 = time.perf_counter()
        model = MRVI.load(args.load_model, adata=adata)
        base.update(load_model_seconds=time.perf_counter() - t0, model_class=type(model).__name__,
                    loaded_model=os.path.abspath(args.load_model))
    else:
        t0 = time.perf_counter()
        try:
            MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch",
                               backend=args.backend)
            model = MRVI(adata, **json.loads(args.model_kwargs))
        except ImportError as e:  # e.g. backend="jax" without scvi-tools[jax]
            emit_result({**base, "seconds": None, "error": f"ImportError: {e}"})
            print(f"backend {args.backend!r} unavailable: {e}", file=sys.stderr)
            return 3
        base["setup_seconds"] = time.perf_counter() - t0
        base["model_class"] = type(model).__name__

        # ---------------------------------------------------------------- training
        epoch_times: list[float] = []
        train_kwargs = dict(max_epochs=max_epochs, batch_size=args.batch_size,
                            train_size=args.train_size, early_stopping=False,
                            accelerator=args.accelerator, devices=1)
        if base["model_class"] == "TorchMRVI":
            from lightning.pytorch.callbacks import Callback

            class EpochTimer(Callback):
                def on_train_epoch_start(self, trainer, pl_module):
                    sync()
                    self._t = time.perf_counter()

                def on_train_epoch_end(self, trainer, pl_module):
                    sync()
                    epoch_times.append(time.perf_counter() - self._t)

            # None -> sys.maxsize inside scvi's Trainer: never run the validation loop
            train_kwargs.update(check_val_every_n_epoch=None, enable_progress_bar=args.progress,
                                callbacks=[EpochTimer()])
        sync()
        t0 = time.perf_counter()
        model.train(**train_kwargs)
        sync()
        train_seconds = time.perf_counter() - t0
        train_idx = getattr(model, "train_indices", None)
        n_train = int(len(train_idx)) if train_idx is not None else int(
            round(adata.n_obs * args.train_size))
        base.update(train_seconds=train_seconds, n_train_cells=n_train, train_size=args.train_size)
        if epoch_times:
            base["epoch_seconds"] = epoch_times

        if args.task == "train":
            epochs_run = len(epoch_times) or max_epochs
            res = {**base, "seconds": train_seconds, "epochs": epochs_run,
                   "cells_per_s": n_train * epochs_run / train_seconds}
            if len(epoch_times) > 1:
                steady = epoch_times[1:]
                res["steady_cells_per_s"] = n_train * len(steady) / sum(steady)
            hist = getattr(model, "history", None) or {}
            for k in ("elbo_train", "reconstruction_loss_train"):
                if k in hist and len(hist[k]):
                    res[f"final_{k}"] = float(np.asarray(hist[k]).ravel()[-1])
            emit_result(res)
            return 0

    if args.save_model:
        model.save(args.save_model, overwrite=True)
        emit_result({**base, "seconds": None, "saved_model": os.path.abspath(args.save_model)})
        return 0

    # ---------------------------------------------------------------- analysis steps
    eval_kw = {} if args.eval_batch_size is None else {"batch_size": args.eval_batch_size}
    if args.task == "distances":
        call = lambda: model.get_local_sample_distances(  # noqa: E731
            groupby=args.groupby, keep_cell=False, **eval_kw)
        extra = {"groupby": args.groupby, "keep_cell": False}
    elif args.task == "de":
        call = lambda: model.differential_expression(  # noqa: E731
            sample_cov_keys=[args.sample_cov], store_lfc=not args.no_lfc,
            mc_samples=args.mc_samples, **eval_kw)
        extra = {"sample_cov_keys": [args.sample_cov], "store_lfc": not args.no_lfc,
                 "mc_samples": args.mc_samples}
    else:  # da
        call = lambda: model.differential_abundance(  # noqa: E731
            sample_cov_keys=[args.sample_cov], **eval_kw)
        extra = {"sample_cov_keys": [args.sample_cov]}
    if eval_kw:
        extra["eval_batch_size"] = args.eval_batch_size

    times = []
    for _ in range(max(1, args.repeats)):
        out = None  # free the previous result before the next repeat
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        times.append(time.perf_counter() - t0)
    seconds = min(times)

    shapes = {}
    try:  # xarray.Dataset: record variable shapes as a sanity check
        for k, v in out.data_vars.items():
            shapes[str(k)] = list(v.shape)
    except AttributeError:
        pass
    emit_result({**base, **extra, "seconds": seconds, "seconds_all": times,
                 "output_shapes": shapes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
