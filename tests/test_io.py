"""Save and load: exact round trip and refusal of foreign or mismatched input."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from mrvi_pyro import MRVI


def test_round_trip_is_exact(trained_model, sim_adata, tmp_path):
    trained_model.save(tmp_path / "m")
    loaded = MRVI.load(tmp_path / "m", adata=sim_adata)
    for key, value in trained_model.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained_model.get_latent_representation())
    np.testing.assert_array_equal(
        loaded.get_normalized_expression(indices=np.arange(30)).to_numpy(),
        trained_model.get_normalized_expression(indices=np.arange(30)).to_numpy(),
    )
    pd.testing.assert_frame_equal(loaded.history, trained_model.history)
    pd.testing.assert_frame_equal(loaded.sample_info, trained_model.sample_info)
    assert loaded.is_trained and loaded.init_params == trained_model.init_params
    metadata = json.loads((tmp_path / "m" / "model.json").read_text())
    assert metadata["format"] == "mrvi_pyro" and metadata["registry"]["var_names"][0] == "gene_000"


def test_load_leaves_the_random_state_alone_and_imports_no_compiler(small_adata, tmp_path):
    """Loading builds the module on the meta device with its random fills skipped: the caller's
    random state is untouched (the same draws follow with or without a load in between), and
    torch._dynamo is never imported (the fills' references on meta imported it: ~2 s and ~65 MB
    per process)."""
    import subprocess
    import sys

    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.save(tmp_path / "m")
    torch.manual_seed(11)
    expected = torch.rand(5)
    torch.manual_seed(11)
    MRVI.load(tmp_path / "m", adata=small_adata)
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)
    small_adata.write_h5ad(tmp_path / "a.h5ad")
    code = ("import sys, anndata; from mrvi_pyro import MRVI; "
            f"m = MRVI.load({str(tmp_path / 'm')!r}, adata=anndata.read_h5ad({str(tmp_path / 'a.h5ad')!r})); "
            "m.get_latent_representation(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_overwrite_and_save_anndata(small_adata, tmp_path):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.save(tmp_path / "m", save_anndata=True)
    with pytest.raises(ValueError, match="overwrite=True"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", overwrite=True, save_anndata=True)
    loaded = MRVI.load(tmp_path / "m")  # uses the saved AnnData
    assert loaded.adata.n_obs == small_adata.n_obs
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_load_refuses_bad_input(small_adata, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MRVI.load(tmp_path / "nothing", adata=small_adata)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a mrvi_pyro model directory"):
        MRVI.load(tmp_path / "empty", adata=small_adata)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="no saved AnnData"):
        MRVI.load(tmp_path / "m")
    with pytest.raises(ValueError, match="same genes"):
        MRVI.load(tmp_path / "m", adata=small_adata[:, :30].copy())
    other = small_adata.copy()
    other.obs["sample"] = other.obs["sample"].cat.rename_categories(lambda c: "x" + c)
    with pytest.raises(ValueError, match="not trained on"):
        MRVI.load(tmp_path / "m", adata=other)
    # a metadata file that is not ours
    (tmp_path / "m" / "model.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not written by mrvi_pyro"):
        MRVI.load(tmp_path / "m", adata=small_adata)


class _Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_load_never_unpickles_code(small_adata, tmp_path):
    model = MRVI(small_adata, n_latent=8, n_latent_u=4)
    model.save(tmp_path / "m")
    with open(tmp_path / "m" / "model.pt", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="cannot|can be loaded safely|not a mrvi_pyro weights"):
        MRVI.load(tmp_path / "m", adata=small_adata)


LEGACY_MODEL = __import__("pathlib").Path(__file__).resolve().parent / "data" / "model_stop7"


def test_model_saved_by_an_earlier_version_loads_and_gives_the_same_outputs():
    """A model saved by commit 1c11752 (before the factorised attention, the NB count tables and
    the flat-buffer training; made as ``tests/data/README.md`` says) loads
    with the current code and reproduces the outputs that version computed."""
    before = {p.name: p.stat().st_mtime_ns for p in LEGACY_MODEL.iterdir()}
    model = MRVI.load(LEGACY_MODEL)  # the AnnData was saved with it
    expected = np.load(LEGACY_MODEL / "expected_outputs.npz")
    np.testing.assert_allclose(model.get_latent_representation(), expected["u"], rtol=1e-5, atol=1e-6)
    z = model.get_local_sample_representation().values  # (cell, sample, latent)
    np.testing.assert_allclose(z, expected["z"], rtol=1e-4, atol=1e-5)
    # the sample-specific part alone (small after 2 epochs), so the attention is really compared
    offsets, expected_offsets = z - z.mean(1, keepdims=True), expected["z"] - expected["z"].mean(1, keepdims=True)
    np.testing.assert_allclose(offsets, expected_offsets, rtol=0, atol=1e-3 * np.abs(expected_offsets).max())
    expr = np.asarray(model.get_normalized_expression(library_size=1.0))[:40]  # that version's default scale
    np.testing.assert_allclose(expr, expected["expr"], rtol=1e-4, atol=1e-7)
    assert {p.name: p.stat().st_mtime_ns for p in LEGACY_MODEL.iterdir()} == before  # read only


ARCHITECTURE_2_MODEL = LEGACY_MODEL.parent / "model_stop16"


def test_architecture_2_model_loads_and_gives_the_same_outputs():
    """A model saved at commit 2324494 (architecture 2: one Linear per attention lift) loads as
    architecture 2 with the current code (whose default is 3) and reproduces that version's outputs."""
    model = MRVI.load(ARCHITECTURE_2_MODEL)
    assert model.init_params["architecture"] == 2
    assert "sample_mapper.attention.q_lift.weight" in model.module.state_dict()
    expected = np.load(ARCHITECTURE_2_MODEL / "expected_outputs.npz")
    np.testing.assert_allclose(model.get_latent_representation(), expected["u"], rtol=1e-5, atol=1e-6)
    z = model.get_local_sample_representation().values
    offsets, expected_offsets = z - z.mean(1, keepdims=True), expected["z"] - expected["z"].mean(1, keepdims=True)
    np.testing.assert_allclose(z, expected["z"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(offsets, expected_offsets, rtol=0, atol=1e-3 * np.abs(expected_offsets).max())
    expr = np.asarray(model.get_normalized_expression(library_size=1.0))[:40]
    np.testing.assert_allclose(expr, expected["expr"], rtol=1e-4, atol=1e-7)


def test_architecture_3_round_trip(small_adata, tmp_path):
    """Architecture 3 (the reference's product lifts, the default) saves and loads as itself;
    architecture 2 stays available to new models."""
    from mrvi_pyro.module import MrVIModule

    assert MRVI(small_adata, n_latent=8, n_latent_u=4).init_params["architecture"] == 3
    legacy = MRVI(small_adata, n_latent=8, n_latent_u=4, architecture=2)
    assert "sample_mapper.attention.q_lift.weight" in legacy.module.state_dict()

    module = MrVIModule(30, 4, 2, n_latent=8, n_latent_u=4, architecture=3)
    keys = module.state_dict().keys()
    assert "sample_mapper.attention.in_proj.weight" in keys and "decoder.nuisance.kv_token.weight" in keys
    assert not any("q_lift" in k for k in keys)
    model = MRVI(small_adata, n_latent=8, n_latent_u=4, architecture=3)  # a module argument since format 2
    assert "sample_mapper.attention.in_proj.weight" in model.module.state_dict()
    model.save(tmp_path / "m")
    loaded = MRVI.load(tmp_path / "m", adata=small_adata)
    assert loaded.init_params["architecture"] == 3
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_training_split_under_scvi_tools_names_survives_save_and_load(trained_model, sim_adata, tmp_path):
    """``train_indices`` / ``validation_indices`` / ``test_indices`` and ``device``, as scvi-tools'
    models have them: the split train() used, kept exactly through save and load."""
    result = trained_model.training_result
    train, validation = trained_model.train_indices, trained_model.validation_indices
    np.testing.assert_array_equal(train, result.train_indices)
    np.testing.assert_array_equal(validation, result.validation_indices)
    assert len(train) + len(validation) == sim_adata.n_obs and len(validation) == 200
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(sim_adata.n_obs))
    assert trained_model.test_indices.shape == (0,)
    assert trained_model.device == torch.device("cpu")
    train[:] = -1  # a copy: the model's split is unchanged
    assert trained_model.train_indices.min() >= 0
    trained_model.save(tmp_path / "m")
    loaded = MRVI.load(tmp_path / "m", adata=sim_adata)
    np.testing.assert_array_equal(loaded.train_indices, result.train_indices)
    np.testing.assert_array_equal(loaded.validation_indices, result.validation_indices)
    assert loaded.test_indices.shape == (0,) and loaded.device == torch.device("cpu")


def test_split_is_none_before_training_and_in_older_saves(small_adata, tmp_path):
    model = MRVI(small_adata)
    assert model.train_indices is None and model.validation_indices is None and model.test_indices is None
    model.save(tmp_path / "untrained")
    assert MRVI.load(tmp_path / "untrained", adata=small_adata).train_indices is None
    model.train(max_epochs=1, train_size=1.0, progress_bar=False)
    assert model.validation_indices.shape == (0,)
    np.testing.assert_array_equal(model.train_indices, np.arange(small_adata.n_obs))
    model.save(tmp_path / "m")
    metadata_file = tmp_path / "m" / "model.json"
    metadata = json.loads(metadata_file.read_text())
    np.testing.assert_array_equal(MRVI.load(tmp_path / "m", adata=small_adata).train_indices, model.train_indices)
    del metadata["split"]  # as saved before the split was kept
    metadata_file.write_text(json.dumps(metadata))
    loaded = MRVI.load(tmp_path / "m", adata=small_adata)
    assert loaded.is_trained and loaded.train_indices is None and loaded.validation_indices is None


@pytest.mark.parametrize("split", [{"n_obs": 10}, {"n_obs": 300, "validation_mask": "AAAA"},
                                   {"n_obs": 16, "validation_mask": "not base64!"},
                                   {"n_obs": True, "validation_mask": ""}, [1, 2]])
def test_load_refuses_a_damaged_split(small_adata, tmp_path, split):
    model = MRVI(small_adata)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    metadata_file = tmp_path / "m" / "model.json"
    metadata = json.loads(metadata_file.read_text())
    metadata["split"] = split
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="malformed training split"):
        MRVI.load(tmp_path / "m", adata=small_adata)


def test_split_json_round_trip_is_exact_at_every_size():
    from mrvi_pyro.io import split_from_json, split_to_json

    rng = np.random.default_rng(0)
    for n_obs in (0, 1, 7, 8, 9, 1000):
        validation = np.sort(rng.choice(n_obs, size=n_obs // 3, replace=False)) if n_obs else np.zeros(0, np.int64)
        train = np.setdiff1d(np.arange(n_obs), validation)
        back = split_from_json(json.loads(json.dumps(split_to_json(train, validation))))
        np.testing.assert_array_equal(back[0], train)
        np.testing.assert_array_equal(back[1], validation)
    assert split_to_json(None, None) is None and split_from_json(None) is None
