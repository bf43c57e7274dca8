"""The ``mrvi-pyro`` command.

- ``mrvi-pyro fit DATA.h5ad --sample-key K [--batch-key K] [--labels-key K] [--layer L] [--nproc N] --out DIR``
  trains MrVI (data-parallel on N local processes with ``--nproc``) and saves it (``DIR/model``)
  with its training history and figures. A checkpoint written after every epoch
  (``DIR/checkpoint``; by rank 0 with ``--nproc``) lets ``--resume`` continue a fit that was
  interrupted (Ctrl-C, a kill, a crash) exactly where it stopped, with the same ``--nproc``.
- ``mrvi-pyro analyze DIR --groupby KEY [--de KEY] [--da KEY] [--nproc N]`` runs the analyses
  (local sample distances, DE and DA sharded over N local processes with ``--nproc``) and writes
  arrays, tables, figures and a report.
- ``mrvi-pyro demo --out DIR`` simulates a cohort with planted truth, trains MrVI on it, saves the
  model and writes figures and a summary.

This module parses the arguments, guards the output directories and maps errors and Ctrl-C to
exit statuses; the work itself (fit, analyses, report, checks against a simulation's truth) is
:mod:`mrvi_pyro.pipeline`, which scripts and notebooks call directly.

Errors in user input are printed as one line (``error: ...``) with exit status 2, never as a
traceback; Ctrl-C exits with status 130.

Outputs are never lost or mixed: ``fit`` and ``demo`` check ``--out`` before training, refuse a
non-empty one unless ``--overwrite`` (and then only a previous run directory), build the run in
a temporary sibling and rename it into place when complete, so an interrupted run leaves
``--out`` as it was, apart from the checkpoint of the interrupted fit in ``--out/checkpoint``
(Ctrl-C prints the command that resumes it). ``analyze`` holds a lock file in its output
directory, refuses earlier analysis outputs unless ``--overwrite`` (which removes them, so no
stale DE/DA result stays beside new ones), writes into a temporary subdirectory and moves the
results in at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from .pipeline import ANALYSIS_OUTPUTS, RUN_OUTPUTS

# numpy, pandas, torch, anndata and matplotlib are imported inside the subcommands (the pipeline
# imports only the standard library at the top), so `mrvi-pyro --help` and `--version` answer at once.


CHECKPOINT_DIR = "checkpoint"
"""Where ``fit`` keeps its training checkpoint inside the run directory."""


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _run_rule(path: Path) -> str | None:
    """``replaceable`` rule of run directories: only our own outputs, and no analysis running."""
    from ._safe_io import LOCK_FILE, lock_owner
    from .checkpoint import checkpoint_rule

    if lock_owner(path / LOCK_FILE) is not None:
        return f"another mrvi-pyro process is writing to it ({path / LOCK_FILE})"
    checkpoint = path / CHECKPOINT_DIR
    if checkpoint.exists() and (not checkpoint.is_dir() or checkpoint_rule(checkpoint) is not None):
        return f"its {CHECKPOINT_DIR!r} is not a mrvi_pyro checkpoint"
    ours = (*RUN_OUTPUTS, CHECKPOINT_DIR, *ANALYSIS_OUTPUTS)
    foreign = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE and not _matches(p.name, ours))
    return f"holds files mrvi-pyro does not write ({foreign[:5]})" if foreign else None


def _staged_run(out: Path, overwrite: bool):
    from ._safe_io import staged_directory

    return staged_directory(out, overwrite=overwrite, what="--out", replaceable=_run_rule, flag="--overwrite")


def _demo(args: argparse.Namespace) -> int:
    from . import __version__
    from .pipeline import run_demo

    out = Path(args.out)
    with _staged_run(out, args.overwrite) as staging:
        print(f"mrvi_pyro {__version__} demo -> {out}")
        lines = run_demo(staging, shown_dir=out, n_cells=args.n_cells, n_genes=args.n_genes,
                         n_samples=args.n_samples, max_epochs=args.max_epochs, batch_size=args.batch_size,
                         seed=args.seed, quiet=args.quiet, command=args.command_line)
    for line in lines:
        print(line)
    print(f"report: {out / 'report.html'}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from . import MRVI
    from ._safe_io import directory_lock, remove_stale_siblings, replace_directory, sibling
    from .pipeline import fit_and_save, read_h5ad

    adata = read_h5ad(args.data)
    print(f"{args.data}: {adata.n_obs} cells x {adata.n_vars} genes")
    # input errors first, then the output directory, both before the (long) training
    MRVI.setup_anndata(adata, sample_key=args.sample_key, batch_key=args.batch_key, labels_key=args.labels_key,
                       layer=args.layer)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be a positive integer; got {args.nproc}")
    if args.batch_size % args.nproc:
        raise ValueError(f"--batch-size {args.batch_size} is the global minibatch and must be divisible by "
                         f"--nproc {args.nproc} (each rank takes batch-size / nproc cells)")
    out = Path(args.out)
    _check_fit_target(out, overwrite=args.overwrite, resume=args.resume)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    checkpoint = out / CHECKPOINT_DIR
    try:
        with directory_lock(out, "fit"):
            if not args.resume and checkpoint.exists():
                shutil.rmtree(checkpoint)  # an earlier fit's, checked above; --overwrite starts again
            staging = sibling(out, "partial")
            staging.mkdir()
            try:
                fit_and_save(adata, staging, sample_key=args.sample_key, batch_key=args.batch_key,
                             labels_key=args.labels_key, layer=args.layer, max_epochs=args.max_epochs,
                             batch_size=args.batch_size, seed=args.seed, quiet=args.quiet, data_path=args.data,
                             shown_dir=out, checkpoint_dir=checkpoint, nproc=args.nproc)
                if checkpoint.exists():
                    shutil.copytree(checkpoint, staging / CHECKPOINT_DIR, copy_function=_link_or_copy)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            replace_directory(staging, out)  # the finished run, checkpoint included, in one rename
    except BaseException as err:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # made by this run and still empty: leave no trace
        if isinstance(err, KeyboardInterrupt):
            return _interrupted_fit(out, args.argv)
        raise
    return 0


def _check_fit_target(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an ``--out`` that ``fit`` must not write to, before any training."""
    from ._safe_io import LOCK_FILE, check_target, lock_owner, remove_stale_siblings
    from .checkpoint import checkpoint_rule

    lock = out / LOCK_FILE
    if out.is_dir() and lock.is_file():
        owner = lock_owner(lock)
        if owner is not None:
            raise ValueError(f"another mrvi-pyro process (pid {owner}) is writing to {out}; wait for it to finish "
                             "or choose another --out.")
        lock.unlink()  # left by a killed mrvi-pyro process
    checkpoint = out / CHECKPOINT_DIR
    if out.is_dir():
        remove_stale_siblings(checkpoint)  # a checkpoint write that was killed half-way
    has_checkpoint = checkpoint.is_dir() and checkpoint_rule(checkpoint) is None
    outputs = sorted(p.name for p in out.iterdir() if p.name != CHECKPOINT_DIR) if out.is_dir() else []
    if resume and not has_checkpoint:
        raise ValueError(f"--resume: {out} holds no checkpoint of an earlier fit; run without --resume to start one.")
    if resume and outputs and not overwrite:
        raise ValueError(f"--resume: {out} also holds the outputs of a finished fit ({', '.join(outputs[:4])}), "
                         "which the resumed fit replaces when it completes; add --overwrite to allow that.")
    if has_checkpoint and not outputs and not resume and not overwrite:
        raise ValueError(f"{out} holds the checkpoint of an unfinished fit ({_epochs_done(checkpoint)} epochs done); "
                         "pass --resume to continue it (same data and options), or --overwrite to start again.")
    check_target(out, overwrite=overwrite or resume, what="--out", replaceable=_run_rule, flag="--overwrite")


def _epochs_done(checkpoint: Path) -> int | str:
    try:
        return int(json.loads((checkpoint / "checkpoint.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _link_or_copy(source: str, destination: str) -> None:
    """Hard link (checkpoint files are replaced, never rewritten in place), else copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _interrupted_fit(out: Path, argv: list[str]) -> int:
    """Ctrl-C during ``fit``: say what was kept and the exact command that resumes it."""
    checkpoint = out / CHECKPOINT_DIR
    if not checkpoint.is_dir():
        print("error: interrupted before the first epoch completed; no checkpoint was saved and earlier outputs "
              f"in {out} are as before", file=sys.stderr)
        return 130
    command = ["mrvi-pyro", *argv, *([] if "--resume" in argv else ["--resume"])]
    print(f"error: interrupted; the checkpoint of the last complete epoch ({_epochs_done(checkpoint)}) is in "
          f"{checkpoint} (earlier outputs in {out} are as before). Continue with:\n  {shlex.join(command)}",
          file=sys.stderr)
    return 130


def _recorded_data(run_dir: Path) -> str:
    """The data file ``fit`` recorded in ``run_dir/fit.json`` (one-line errors if unusable)."""
    fit_info = run_dir / "fit.json"
    if not fit_info.is_file():
        raise ValueError(f"no data file recorded in {run_dir}; pass --data DATA.h5ad")
    try:
        record = json.loads(fit_info.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{fit_info} is not readable JSON ({err}); pass --data DATA.h5ad") from None
    data_path = record.get("data") if isinstance(record, dict) else None
    if data_path is None:
        raise ValueError(f"no data file recorded in {run_dir}; pass --data DATA.h5ad")
    if not isinstance(data_path, str):
        raise ValueError(f"{fit_info}: 'data' must be a file path, got {data_path!r}; pass --data DATA.h5ad")
    return data_path


def _analyze(args: argparse.Namespace) -> int:
    from . import MRVI
    from ._safe_io import directory_lock, move_into, sibling
    from .pipeline import analysis_rank, analyze_model, check_columns, read_h5ad

    run_dir = Path(args.dir)
    if not (run_dir / "model").exists() and (run_dir / CHECKPOINT_DIR).is_dir():
        raise ValueError(f"{run_dir} holds an unfinished fit (a checkpoint, no model yet); finish it first with "
                         "`mrvi-pyro fit ... --resume` (same arguments as the fit, plus --resume)")
    data_path = args.data if args.data is not None else _recorded_data(run_dir)
    out = Path(args.out or run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory; choose another path.")
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, "analyze"):
        adata = read_h5ad(data_path)
        model = MRVI.load(run_dir / "model", adata=adata)
        check_columns(adata, args.groupby, args.de, args.da, args.basis)
        previous = sorted(p for p in out.iterdir() if _matches(p.name, ANALYSIS_OUTPUTS))
        if previous and not args.overwrite:
            raise ValueError(f"{out} already holds analysis outputs ({', '.join(p.name for p in previous[:4])}); "
                             "pass --overwrite to replace them, or choose another --out.")
        if args.nproc < 1:
            raise ValueError(f"--nproc must be a positive integer; got {args.nproc}")
        precomputed = None
        if args.nproc > 1:  # distances, DE and DA sharded over local ranks; the rest here
            from . import distributed

            precomputed = distributed.launch(analysis_rank, args.nproc, str(data_path), str(run_dir / "model"),
                                             args.groupby, args.da, args.de, args.mc_samples, args.seed)
        staging = sibling(out / "analysis", "partial")
        staging.mkdir()
        try:
            analyze_model(model, adata, staging, groupby=args.groupby, de=args.de, da=args.da,
                          quiet=args.quiet, mc_samples=args.mc_samples, seed=args.seed, basis=args.basis,
                          data_path=data_path, command=args.command_line, precomputed=precomputed)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for path in previous:  # outputs of an earlier analysis, replaced as a whole
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        move_into(staging, out)
    if not args.quiet:
        print(f"[analyze] report: {out / 'report.html'}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off switches)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mrvi-pyro", description="MrVI in Pyro: multi-sample single-cell analysis.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str):
        return sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    demo = command("demo", "simulate a cohort, train MrVI and write figures, a summary and a report")
    demo.add_argument("--out", default="mrvi_demo", help="output directory")
    demo.add_argument("--n-cells", type=int, default=3000, help="simulated cells")
    demo.add_argument("--n-genes", type=int, default=200, help="simulated genes")
    demo.add_argument("--n-samples", type=int, default=12, help="simulated samples")
    demo.add_argument("--max-epochs", type=int, default=100, help="training epochs")
    demo.add_argument("--batch-size", type=int, default=128,
                      help="cells per step (as MRVI.train; in 100 epochs every planted-truth check passed for "
                           "all 5 simulation seeds measured, 0-4, at 128 and at 256, with architecture 3, the "
                           "default)")
    demo.add_argument("--seed", type=int, default=3, help="seeds the simulation, initialisation and training")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    demo.set_defaults(func=_demo)

    fit = command("fit", "train MrVI on an .h5ad of raw counts and save it")
    fit.add_argument("data", help="AnnData file (.h5ad) with raw counts")
    fit.add_argument("--sample-key", required=True, help="obs column of the sample (e.g. donor)")
    fit.add_argument("--batch-key", default=None, help="obs column of a nuisance covariate (batch, site)")
    fit.add_argument("--labels-key", default=None, help="obs column of cell-type labels")
    fit.add_argument("--layer", default=None, help="layer holding the raw counts (default: X)")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--max-epochs", type=int, default=None,
                     help="training epochs (default: min(round(20000 / n_cells * 400), 400))")
    fit.add_argument("--batch-size", type=int, default=128, help="cells per step (as MRVI.train)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the initialisation and training")
    fit.add_argument("--nproc", type=int, default=1,
                     help="train data-parallel on this many local processes (torch.distributed: gloo on CPU, "
                          "NCCL with one GPU each); --batch-size is the global minibatch and must be divisible "
                          "by it; rank 0 writes the checkpoint, and --resume needs the same --nproc")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in --out (its model, checkpoint and analysis outputs)")
    fit.add_argument("--resume", action="store_true",
                     help="continue the interrupted fit whose checkpoint is in --out/checkpoint (same data and "
                          "options; --max-epochs may be raised); with --overwrite also when --out holds a finished "
                          "run, whose outputs are replaced when the resumed fit completes")
    fit.set_defaults(func=_fit)

    analyze = command("analyze", "run distances, DE and DA on a fitted model; write results and a report")
    analyze.add_argument("dir", help="directory written by `mrvi-pyro fit`")
    analyze.add_argument("--data", default=None, help="AnnData file (default: the one used by fit)")
    analyze.add_argument("--groupby", required=True, help="obs column to group cells by (e.g. cell type)")
    analyze.add_argument("--de", default=None, help="sample covariate for differential expression")
    analyze.add_argument("--da", default=None, help="sample covariate for differential abundance")
    analyze.add_argument("--basis", default=None,
                         help="obsm key of the 2-d embedding to draw cells on, e.g. X_umap (default: PCA of u)")
    analyze.add_argument("--out", default=None, help="output directory (default: DIR)")
    analyze.add_argument("--mc-samples", type=int, default=20, help="posterior draws for DE log fold-changes")
    analyze.add_argument("--seed", type=int, default=0, help="seeds the posterior draws")
    analyze.add_argument("--nproc", type=int, default=1,
                         help="compute the local sample distances, DE and DA on this many local processes "
                              "(torch.distributed); the summaries and figures run in this process")
    analyze.add_argument("--quiet", action="store_true", help="no progress messages")
    analyze.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier analysis")
    analyze.set_defaults(func=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._malloc import tune_malloc

    tune_malloc()  # the command's process is its own: reuse freed minibatch memory (opt-in for library calls)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = ["mrvi-pyro", *(sys.argv[1:] if argv is None else argv)]
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing partial was saved (the output directory is as before)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
