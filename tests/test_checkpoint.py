"""Checkpoints: a resumed run ends where an uninterrupted one does (in process, after SIGKILL,
after a kill inside a checkpoint write, through the command line); foreign or mismatched
checkpoints are refused and left as they were."""

import inspect
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mrvi_pyro
from mrvi_pyro import MRVI
from mrvi_pyro.cli import main

TRAIN = dict(batch_size=32, progress_bar=False, n_epochs_kl_warmup=3)
_SOURCE = str(Path(mrvi_pyro.__file__).resolve().parents[1])
_ENV = {**os.environ, "PYTHONPATH": _SOURCE, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Runs compared here train in this process and in subprocesses started with one thread;
    float reductions depend on the thread count, so this process uses one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(seed=1, n_cells=150):
    adata = mrvi_pyro.datasets.simulate(n_cells=n_cells, n_genes=20, n_samples=4, seed=seed, n_de_genes=4,
                                        n_group_genes=4)
    MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
    return adata


def _model(adata, **kwargs):
    return MRVI(adata, **{"n_latent": 4, "n_latent_u": 2, "encoder_n_hidden": 16, "seed": 0, **kwargs})


def _assert_same_run(model, reference):
    state, expected = model.module.state_dict(), reference.module.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    pd.testing.assert_frame_equal(model.history.drop(columns="seconds"), reference.history.drop(columns="seconds"))


def _files(path):
    return {p.relative_to(path): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def adata():
    return _data()


@pytest.fixture(scope="module")
def uninterrupted(adata):
    """Six epochs without a checkpoint: what every resumed run must end with."""
    model = _model(adata)
    model.train(max_epochs=6, **TRAIN)
    return model


# ----- resuming -------------------------------------------------------------------------------
def test_resume_in_process_equals_the_uninterrupted_run(adata, uninterrupted, tmp_path):
    """The optimiser is torch's per-tensor Adam: its state (moments and step counts of every
    parameter tensor) is saved and restored, so the resumed run is the uninterrupted one."""
    reference = uninterrupted
    first = _model(adata)
    first.train(max_epochs=3, checkpoint_dir=tmp_path / "ck", **TRAIN)
    assert json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary siblings left
    resumed = _model(adata, seed=5)  # other initial weights: the checkpoint's replace them
    result = resumed.train(max_epochs=6, checkpoint_dir=tmp_path / "ck", **TRAIN)
    _assert_same_run(resumed, reference)
    assert list(result.history.index) == list(range(6))
    np.testing.assert_array_equal(result.train_indices, reference.training_result.train_indices)
    np.testing.assert_array_equal(result.validation_indices, reference.training_result.validation_indices)
    # the same model object can go on too, and asking for what is done trains nothing
    first.train(max_epochs=6, checkpoint_dir=tmp_path / "ck", **TRAIN)
    _assert_same_run(first, reference)


def test_resume_across_the_learning_rate_switch(tmp_path):
    """At batch 256, lr=None trains at 2e-3 during the KL warm-up and at the scaled rate after:
    a run resumed before the switch follows the uninterrupted one through it."""
    adata = _data(n_cells=700)
    settings = dict(TRAIN, batch_size=256, n_epochs_kl_warmup=2)
    reference = _model(adata)
    reference.train(max_epochs=4, **settings)
    assert reference.history["lr"].tolist() == [2e-3, 2e-3, 2e-3 * 2**0.5, 2e-3 * 2**0.5]
    first = _model(adata)
    first.train(max_epochs=1, checkpoint_dir=tmp_path / "ck", **settings)
    resumed = _model(adata, seed=5)
    resumed.train(max_epochs=4, checkpoint_dir=tmp_path / "ck", **settings)
    _assert_same_run(resumed, reference)


def test_a_checkpointed_run_equals_one_without_checkpoints(adata, uninterrupted, tmp_path):
    model = _model(adata)
    model.train(max_epochs=6, checkpoint_dir=tmp_path / "ck", **TRAIN)
    _assert_same_run(model, uninterrupted)
    for key, value in uninterrupted.module.state_dict().items():  # bit for bit
        assert torch.equal(model.module.state_dict()[key], value), key


def test_resume_leaves_the_global_random_state_alone(adata, tmp_path):
    _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path / "ck", **TRAIN)
    np.random.seed(7)
    torch.manual_seed(7)
    numpy_before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state()
    _model(adata).train(max_epochs=3, checkpoint_dir=tmp_path / "ck", **TRAIN)
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_before)
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_an_early_stop_is_kept_on_resume(adata, tmp_path):
    options = dict(TRAIN, early_stopping=True, early_stopping_patience=1, early_stopping_min_delta=1e6)
    model = _model(adata)
    model.train(max_epochs=10, checkpoint_dir=tmp_path / "ck", **options)
    assert model.training_result.stopped_early and len(model.history) == 2
    again = _model(adata, seed=5)
    result = again.train(max_epochs=10, checkpoint_dir=tmp_path / "ck", **options)
    assert result.stopped_early
    _assert_same_run(again, model)


_KILLED_RUN = """
import os, signal, sys, torch
import mrvi_pyro
from mrvi_pyro import MRVI, checkpoint
directory, mode = sys.argv[1], sys.argv[2]
adata = mrvi_pyro.datasets.simulate(n_cells=150, n_genes=20, n_samples=4, seed=1, n_de_genes=4, n_group_genes=4)
MRVI.setup_anndata(adata, sample_key="sample", batch_key="batch")
model = MRVI(adata, n_latent=4, n_latent_u=2, encoder_n_hidden=16, seed=0)
if mode == "inside_write":  # die half-way through writing the checkpoint of epoch 3
    save, calls = torch.save, []
    def save_then_die(obj, path):
        calls.append(path)
        save(obj, path)
        if len(calls) == 3:
            with open(path, "r+b") as file:
                file.truncate(100)
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.torch.save = save_then_die
model.train(max_epochs=int(sys.argv[3]), batch_size=32, progress_bar=False, n_epochs_kl_warmup=3,
            checkpoint_dir=directory)
"""


def _epochs_done(directory):
    try:
        return json.loads((Path(directory) / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def _kill_when(process, directory, epochs, sig=signal.SIGKILL, timeout=120):
    """Send ``sig`` to ``process`` as soon as the checkpoint of ``epochs`` epochs exists."""
    deadline = time.monotonic() + timeout
    while _epochs_done(directory) < epochs:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the training run wrote no checkpoint in time"
        time.sleep(0.005)
    process.send_signal(sig)
    return process.communicate(timeout=timeout)


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(adata, uninterrupted, tmp_path):
    reference = _model(adata)
    reference.train(max_epochs=12, **TRAIN)
    directory = tmp_path / "ck"
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(directory), "poll", "12"], env=_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(process, directory, 3)
    assert process.returncode == -signal.SIGKILL
    done = _epochs_done(directory)
    assert 3 <= done < 12  # killed mid-training
    resumed = _model(adata)
    resumed.train(max_epochs=12, checkpoint_dir=directory, **TRAIN)
    _assert_same_run(resumed, reference)


def test_a_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(adata, uninterrupted, tmp_path):
    directory = tmp_path / "ck"
    result = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(directory), "inside_write", "6"], env=_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert _epochs_done(directory) == 2  # the third write died half-way; the second is intact
    leftovers = [p for p in tmp_path.iterdir() if p.name != "ck"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ck.partial-")  # the killed write's
    resumed = _model(adata)
    resumed.train(max_epochs=6, checkpoint_dir=directory, **TRAIN)
    _assert_same_run(resumed, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the dead writer's sibling is cleared


# ----- refusals -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(adata, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint") / "ck"
    _model(adata).train(max_epochs=2, checkpoint_dir=directory, **TRAIN)
    return directory


@pytest.mark.parametrize("change, message", [
    (dict(train={"lr": 1e-3}), r"training.lr \(checkpoint 0.002, now 0.001\)"),  # default_lr(32) = 2e-3
    (dict(train={"batch_size": 16}), r"training.batch_size \(checkpoint 32, now 16\)"),
    (dict(train={"seed": 1}), r"training.seed \(checkpoint 0, now 1\)"),
    (dict(train={"train_size": 0.8}), r"training.train_size \(checkpoint 0.9, now 0.8\)"),
    (dict(train={"n_epochs_kl_warmup": 20}), r"training.n_epochs_kl_warmup"),
    (dict(train={"warmup_zero_grads": not inspect.signature(MRVI.train).parameters["warmup_zero_grads"].default}),
     r"training.warmup_zero_grads"),
    (dict(model={"n_latent": 5}), r"model.n_latent \(checkpoint 4, now 5\)"),
    (dict(model={"likelihood": "poisson"}), r"model.likelihood \(checkpoint 'nb', now 'poisson'\)"),
    (dict(data={"seed": 2}), r"the data differ \(data.codes, data.counts: other cells"),
], ids=["lr", "batch_size", "seed", "train_size", "warmup", "warmup_zero_grads", "n_latent", "likelihood", "data"])
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(checkpoint_dir, adata, change, message):
    before = _files(checkpoint_dir)
    data = _data(**change["data"]) if "data" in change else adata
    model = _model(data, **change.get("model", {}))
    with pytest.raises(ValueError, match="holds a checkpoint of another training run, so it cannot be resumed: "
                                         + message):
        model.train(max_epochs=4, checkpoint_dir=checkpoint_dir, **{**TRAIN, **change.get("train", {})})
    assert _files(checkpoint_dir) == before and not model.is_trained


def test_other_sample_assignments_are_other_data(checkpoint_dir, adata):
    shuffled = adata.copy()
    shuffled.obs["sample"] = shuffled.obs["sample"].to_numpy()[::-1]
    with pytest.raises(ValueError, match=r"the data differ \(data.codes: other cells"):
        _model(shuffled).train(max_epochs=4, checkpoint_dir=checkpoint_dir, **TRAIN)


def test_unusable_checkpoint_dirs_are_refused_and_left_alone(checkpoint_dir, adata, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"is not a mrvi_pyro checkpoint \(it holds \['notes.txt'\]\); choose a new"):
        _model(adata).train(max_epochs=1, checkpoint_dir=folder, **TRAIN)
    assert _files(folder) == {Path("notes.txt"): b"precious"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a directory"):
        _model(adata).train(max_epochs=1, checkpoint_dir=tmp_path / "file", **TRAIN)
    with pytest.raises(ValueError, match=r"holds 2 completed epochs, more than max_epochs=1"):
        _model(adata).train(max_epochs=1, checkpoint_dir=checkpoint_dir, **TRAIN)


def test_a_hostile_checkpoint_file_is_refused_without_running_it(checkpoint_dir, adata, tmp_path):
    import shutil

    directory = Path(shutil.copytree(checkpoint_dir, tmp_path / "ck"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (directory / "state.pt").write_bytes(pickle.dumps({"module": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="state.pt cannot be loaded safely"):
        _model(adata).train(max_epochs=3, checkpoint_dir=directory, **TRAIN)
    assert not marker.exists()


# ----- command line ---------------------------------------------------------------------------
def _fit_arguments(data, out, *extra):
    return ["fit", str(data), "--sample-key", "sample", "--batch-key", "batch", "--out", str(out),
            "--max-epochs", "12", "--batch-size", "32", "--quiet", *extra]


def test_fit_interrupted_by_ctrl_c_and_killed_resumes_to_the_uninterrupted_model(adata, tmp_path, capsys):
    data = tmp_path / "data.h5ad"
    raw = adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(data)
    assert main(_fit_arguments(data, tmp_path / "whole")) == 0
    run, command = tmp_path / "run", [sys.executable, "-m", "mrvi_pyro.cli"]

    # Ctrl-C: exit 130, a checkpoint, and the exact command that resumes it
    # Ctrl-C must reach the child as it reaches a terminal's: a shell that runs the tests in the
    # background (``pytest &``) starts them with SIGINT ignored, which the child would inherit.
    process = subprocess.Popen(command + _fit_arguments(data, run), env=_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _, err = _kill_when(process, run / "checkpoint", 2, sig=signal.SIGINT)
    assert process.returncode == 130, err
    printed = err.strip().splitlines()[-1].strip()
    assert printed == shlex.join(["mrvi-pyro", *_fit_arguments(data, run), "--resume"])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    (run / f".checkpoint.partial-{process.pid}-0123abcd").mkdir()  # as a write killed half-way leaves it
    assert main(_fit_arguments(data, run)) == 2  # without --resume: refused, nothing touched
    assert "holds the checkpoint of an unfinished fit" in capsys.readouterr().err
    assert main(["analyze", str(run), "--groupby", "cell_type"]) == 2
    assert "unfinished fit" in capsys.readouterr().err

    # SIGKILL during the resumed run, then resume again with the printed command
    process = subprocess.Popen(command + shlex.split(printed)[1:], env=_ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    done = _epochs_done(run / "checkpoint")
    _kill_when(process, run / "checkpoint", done + 2)
    assert process.returncode == -signal.SIGKILL
    assert main(shlex.split(printed)[1:]) == 0

    whole, resumed = MRVI.load(tmp_path / "whole" / "model", adata=adata), MRVI.load(run / "model", adata=adata)
    _assert_same_run(resumed, whole)
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.h5ad", "run", "whole"]  # no staging left
    # a finished run: --resume needs --overwrite to replace its outputs; more epochs continue it
    assert main(_fit_arguments(data, run, "--resume")) == 2
    assert "add --overwrite" in capsys.readouterr().err


# ----- data-parallel training -----------------------------------------------------------------
DATA_PARALLEL_EPOCHS = 4


def _checkpointed_ranks(directory: str, one_process_checkpoint: str) -> dict:
    """On each of 2 ranks, with the shared draws and with each rank's own stream: an
    uninterrupted run, and one stopped after 2 epochs and resumed (from other initial weights)
    to the same end; also which epochs this rank wrote, and the refusal of a one-process
    checkpoint."""
    from mrvi_pyro import checkpoint, distributed

    written, write = [], checkpoint.TrainingCheckpoint.write

    def counted_write(self, state):
        written.append(state.epoch)
        write(self, state)

    checkpoint.TrainingCheckpoint.write = counted_write
    adata, out = _data(), {}
    for draws in ("1", "0"):
        os.environ["MRVI_PYRO_SAME_DRAWS"] = draws
        whole = _model(adata)
        whole.train(max_epochs=DATA_PARALLEL_EPOCHS, **TRAIN)
        path = os.path.join(directory, f"draws{draws}")
        _model(adata).train(max_epochs=2, checkpoint_dir=path, **TRAIN)
        resumed = _model(adata, seed=5)
        resumed.train(max_epochs=DATA_PARALLEL_EPOCHS, checkpoint_dir=path, **TRAIN)
        out[draws] = {name: ({k: v.clone() for k, v in model.module.state_dict().items()}, model.history)
                      for name, model in (("whole", whole), ("resumed", resumed))}
    del os.environ["MRVI_PYRO_SAME_DRAWS"]
    refusal = None
    try:  # a one-process checkpoint
        _model(adata).train(max_epochs=3, checkpoint_dir=one_process_checkpoint, **TRAIN)
    except ValueError as err:
        refusal = str(err)
    per_rank = [None] * 2
    torch.distributed.all_gather_object(per_rank, {"written": written, "refusal": refusal,
                                                   "runs": out, "rank": distributed.rank()})
    return per_rank


@pytest.fixture(scope="module")
def two_ranks(checkpoint_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("two_ranks")
    return directory, mrvi_pyro.distributed.launch(_checkpointed_ranks, 2, str(directory), str(checkpoint_dir),
                                                   threads=1)


@pytest.mark.parametrize("draws", ["1", "0"], ids=["same_draws", "own_draws"])
def test_two_ranks_resumed_equal_two_ranks_uninterrupted(two_ranks, draws):
    """Exact on both ranks, also when each rank draws from its own stream (whose states rank 0
    gathered into the checkpoint)."""
    _, per_rank = two_ranks
    for rank in per_rank:
        runs = rank["runs"][draws]
        (whole, whole_history), (resumed, resumed_history) = runs["whole"], runs["resumed"]
        for key, value in whole.items():
            assert torch.equal(resumed[key], value), (rank["rank"], key)
        pd.testing.assert_frame_equal(resumed_history.drop(columns="seconds"), whole_history.drop(columns="seconds"))
        assert list(resumed_history.index) == list(range(DATA_PARALLEL_EPOCHS))


def test_only_rank_0_writes_and_it_stores_every_rank_s_random_state(two_ranks):
    directory, per_rank = two_ranks
    assert per_rank[0]["written"] == [1, 2, 3, 4] * 2 and per_rank[1]["written"] == []
    for draws in ("1", "0"):
        metadata = json.loads((directory / f"draws{draws}" / "checkpoint.json").read_text())
        assert metadata["world_size"] == 2 and metadata["identity"]["training"]["world_size"] == 2
        assert metadata["epoch"] == DATA_PARALLEL_EPOCHS
        state = torch.load(directory / f"draws{draws}" / "state.pt", weights_only=True)
        same = torch.equal(state["torch_rng"], state["rank_torch_rng"][0])
        assert same == (draws == "1")  # the ranks' streams are one stream only with the shared draws
    assert sorted(p.name for p in directory.iterdir()) == ["draws0", "draws1"]  # no staging left


def test_a_checkpoint_of_another_world_size_is_refused(two_ranks, checkpoint_dir, adata):
    directory, per_rank = two_ranks
    for rank in per_rank:  # a one-process checkpoint on 2 ranks: the same error on both
        assert "was written by a run on 1 rank(s) and this run has 2; resume it with the same number of ranks " \
               "(in one process)" in rank["refusal"]
    before = _files(directory / "draws1")
    with pytest.raises(ValueError, match=r"was written by a run on 2 rank\(s\) and this run has 1; resume it with "
                                         r"the same number of ranks \(torchrun --nproc-per-node 2"):
        _model(adata).train(max_epochs=6, checkpoint_dir=directory / "draws1", **TRAIN)
    assert _files(directory / "draws1") == before


def test_fit_on_two_ranks_resumes_on_two_ranks_only(adata, tmp_path, capsys):
    data = tmp_path / "data.h5ad"
    raw = adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(data)
    run = tmp_path / "run"

    def fit(epochs, *extra):
        return main(["fit", str(data), "--sample-key", "sample", "--batch-key", "batch", "--out", str(run),
                     "--max-epochs", str(epochs), "--batch-size", "32", "--quiet", *extra])

    assert fit(2, "--nproc", "2") == 0
    first = pd.read_csv(run / "history.csv", index_col="epoch")
    assert _epochs_done(run / "checkpoint") == 2
    assert fit(3, "--nproc", "1", "--resume", "--overwrite") == 2
    assert "was written by a run on 2 rank(s) and this run has 1" in capsys.readouterr().err
    assert fit(3, "--nproc", "2", "--resume", "--overwrite") == 0
    resumed = pd.read_csv(run / "history.csv", index_col="epoch")
    assert list(resumed.index) == [0, 1, 2] and _epochs_done(run / "checkpoint") == 3
    pd.testing.assert_frame_equal(resumed.iloc[:2].drop(columns="seconds"), first.drop(columns="seconds"))
