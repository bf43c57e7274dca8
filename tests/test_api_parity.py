"""Our public signatures against a stored snapshot of the reference's (scvi-tools 1.4.2, torch MRVI).

The snapshot (``tests/data/reference_mrvi_signatures.json``, written by
``tests/data/make_reference_signatures.py``) has every public method's parameters: names, order,
kinds and defaults. A call written for the reference must mean the same here, or fail loudly:

- every reference method is implemented, or listed in ``NOT_IMPLEMENTED`` with the reason;
- every reference parameter exists here with the same default and, when both are positional,
  at the same position; each exception is listed in ``DIFFERENCES`` with the reason;
- where our positional order differs, our arguments are keyword-only (a positional reference
  call raises a TypeError instead of binding to the wrong argument): ``KEYWORD_ONLY_HERE``;
- our own additions are keyword-only, so they never shift a reference argument;
- no entry of these lists is stale.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from mrvi_pyro import MRVI

DATA = Path(__file__).with_name("data")
SNAPSHOT = json.loads((DATA / "reference_mrvi_signatures.json").read_text())
_spec = importlib.util.spec_from_file_location("make_reference_signatures", DATA / "make_reference_signatures.py")
_generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generator)

REFERENCE = SNAPSHOT["methods"]
OURS = _generator.describe(MRVI)
POSITIONAL = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")

_REGISTRY = "scvi-tools' AnnDataManager machinery; here the registry is model.registry (setup_anndata's keys)"
_GENERIC = "a generic scvi-tools model method that MrVI analyses do not need; not implemented"
NOT_IMPLEMENTED = {
    "compute_local_statistics": "the reference's generic reduction driver; its two uses are implemented directly "
                                "(get_local_sample_representation, get_local_sample_distances)",
    **dict.fromkeys(["convert_legacy_save", "load_registry"], "no legacy scvi-tools save format to convert or read"),
    **dict.fromkeys(["data_registry", "deregister_manager", "get_anndata_manager", "get_from_registry", "get_setup_arg",
                     "get_state_registry", "get_var_names", "register_manager", "transfer_fields",
                     "update_setup_method_args", "view_anndata_setup", "view_registry", "view_setup_args",
                     "view_setup_method_args"], _REGISTRY),
    **dict.fromkeys(["get_batch_representation", "get_feature_correlation_matrix",
                     "get_importance_weights"], _GENERIC),
    "get_marginal_ll": "z's posterior is a point (a Delta on z_base(u) + f(u, s)), so an importance-sampled "
                       "log p(x) is not defined; the reference's MRVI module has no marginal_ll either",
    **dict.fromkeys(["load_query_data", "prepare_query_anndata", "prepare_query_mudata"],
                    "query mapping (scArches) is not implemented"),
    "minify_adata": "minified AnnData is not supported",
}

_LIGHTNING = "no Lightning trainer: one device, chosen by device= ('auto', 'cpu', 'cuda')"
DIFFERENCES = {
    ("__init__", "adata"): "required: a model is built on a registered AnnData",
    ("__init__", "registry"): "no AnnDataManager registry object; load() restores a saved model",
    ("setup_anndata", "sample_key"): "required (no default): MrVI needs samples",
    ("setup_anndata", "kwargs"): "no extra registry fields",
    ("train", "accelerator"): _LIGHTNING,
    ("train", "devices"): _LIGHTNING,
    ("train", "train_size"): "0.9 written out (the reference's None means its splitter's 0.9)",
    ("train", "trainer_kwargs"): "no Lightning trainer; our options (lr, clip_norm, seed, ...) are named",
    ("get_latent_representation", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_normalized_expression", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_elbo", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_elbo", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("get_elbo", "kwargs"): "no module keywords to pass; seed= chooses the posterior draw",
    ("get_reconstruction_error", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_reconstruction_error", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("get_reconstruction_error", "kwargs"): "no module keywords to pass; seed= chooses the posterior draw",
    ("get_normalized_expression", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("get_latent_library_size", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_latent_library_size", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("get_likelihood_parameters", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("get_likelihood_parameters", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("posterior_predictive_sample", "dataloader"): "no scvi-tools dataloaders: pass adata/indices",
    ("posterior_predictive_sample", "data_loader_kwargs"): "no scvi-tools dataloaders",
    ("get_normalized_expression", "importance_weighting_kwargs"): "importance weights are not implemented",
    ("update_sample_info", "adata"): "optional: defaults to the model's AnnData",
    ("to_device", "device"): "optional: defaults to 'auto'",
    ("save", "prefix"): "one file layout (model.pt + model.json), no prefixes",
    ("save", "save_kwargs"): "weights are saved with torch.save, metadata as JSON: nothing to pass",
    ("save", "legacy_mudata_format"): "no MuData",
    ("save", "datamodule"): "no Lightning datamodules",
    ("save", "anndata_write_kwargs"): "the AnnData is written with defaults (save_anndata=True)",
    ("load", "accelerator"): _LIGHTNING,
    ("load", "device"): "'cpu' by default (a model is moved with to_device)",
    ("load", "prefix"): "one file layout, no prefixes",
    ("load", "backup_url"): "never downloads",
    ("load", "datamodule"): "no Lightning datamodules",
    ("load", "allowed_classes_names_list"): "one model class",
}

KEYWORD_ONLY_HERE = {
    "setup_anndata": "the reference puts layer second; keyword-only here so setup_anndata(adata, 'donor') cannot "
                     "silently mean a layer",
    "train": "the reference's second and third arguments are Lightning's accelerator and devices",
    "save": "the reference's second argument is prefix",
    "load": "the reference's third argument is accelerator",
    "get_elbo": "the reference's fourth argument is a dataloader",
    "get_reconstruction_error": "the reference's fourth argument is a dataloader",
    "posterior_predictive_sample": "the reference's seventh argument is a dataloader (silent is keyword-only here)",
}


def _parameters(method: str, table: dict) -> list[dict]:
    return [p for p in table[method] if p["kind"] != "VAR_POSITIONAL"]


def _problem(method: str, ref: dict, ref_position: int) -> str | None:
    """What differs for one reference parameter (None: nothing)."""
    ours = _parameters(method, OURS)
    if ref["kind"] == "VAR_KEYWORD":
        return None if any(p["kind"] == "VAR_KEYWORD" for p in ours) else "no **kwargs here"
    match = [p for p in ours if p["name"] == ref["name"]]
    if not match:
        return "missing here"
    mine = match[0]
    if ("default" in ref) != ("default" in mine) or ref.get("default") != mine.get("default"):
        return f"default {mine.get('default', '<required>')!r} here, {ref.get('default', '<required>')!r} there"
    if ref["kind"] == "KEYWORD_ONLY" and mine["kind"] != "KEYWORD_ONLY":
        return "keyword-only there, positional here"
    if ref["kind"] in POSITIONAL and mine["kind"] == "KEYWORD_ONLY" and method not in KEYWORD_ONLY_HERE:
        return "positional there, keyword-only here"
    if ref["kind"] in POSITIONAL and mine["kind"] in POSITIONAL:
        positional = [p["name"] for p in ours if p["kind"] in POSITIONAL]
        if positional.index(ref["name"]) != ref_position:
            return f"position {positional.index(ref['name'])} here, {ref_position} there"
    return None


def test_snapshot_is_the_reference_torch_mrvi():
    assert SNAPSHOT["source"].startswith("scvi-tools 1.4.2, scvi.external.mrvi_torch.TorchMRVI")
    assert {"differential_expression", "get_local_sample_distances", "train"} <= set(REFERENCE)


def test_every_reference_method_is_implemented_or_listed():
    missing = sorted(set(REFERENCE) - set(OURS) - set(NOT_IMPLEMENTED))
    assert not missing, f"reference methods neither implemented nor listed in NOT_IMPLEMENTED: {missing}"
    stale = sorted(set(NOT_IMPLEMENTED) & set(OURS))
    assert not stale, f"listed as not implemented but implemented: {stale}"
    assert set(NOT_IMPLEMENTED) <= set(REFERENCE)


@pytest.mark.parametrize("method", sorted(set(REFERENCE) & set(OURS)))
def test_reference_parameters_mean_the_same_here(method):
    reference = _parameters(method, REFERENCE)
    positional = [p for p in reference if p["kind"] in POSITIONAL]
    unexpected, stale = [], []
    for ref in reference:
        problem = _problem(method, ref, positional.index(ref) if ref in positional else -1)
        listed = (method, ref["name"]) in DIFFERENCES
        if problem and not listed:
            unexpected.append(f"{ref['name']}: {problem}")
        if listed and not problem:
            stale.append(ref["name"])
    assert not unexpected, f"{method}: undocumented differences from the reference: {unexpected}"
    assert not stale, f"{method}: DIFFERENCES lists {stale}, which match the reference"


@pytest.mark.parametrize("method", sorted(set(REFERENCE) & set(OURS)))
def test_our_additions_are_keyword_only_and_reordered_methods_are_keyword_only(method):
    names = {p["name"] for p in REFERENCE[method]}
    ours = [p for p in OURS[method] if p["kind"] != "VAR_KEYWORD"]
    positional_additions = [p["name"] for p in ours if p["name"] not in names and p["kind"] in POSITIONAL]
    assert not positional_additions, f"{method}: our additions {positional_additions} must be keyword-only"
    shared_positional_ref = [p["name"] for p in REFERENCE[method] if p["kind"] in POSITIONAL]
    shared_keyword_only_here = [p["name"] for p in ours if p["name"] in shared_positional_ref
                                and p["kind"] == "KEYWORD_ONLY"]
    assert bool(shared_keyword_only_here) == (method in KEYWORD_ONLY_HERE), (method, shared_keyword_only_here)


def test_use_vmap_is_accepted_and_checked_where_the_reference_has_it(small_adata):
    with_use_vmap = sorted(m for m, ps in REFERENCE.items() if any(p["name"] == "use_vmap" for p in ps) and m in OURS)
    assert with_use_vmap == ["differential_expression", "get_local_sample_distances",
                             "get_local_sample_representation"]
    model = MRVI(small_adata, n_latent=4, n_latent_u=3)
    model.is_trained = True  # the arguments are what is checked here, not the weights
    cells = small_adata[:40].copy()
    for use_vmap in ("auto", True, False):
        model.differential_expression(cells, sample_cov_keys=["disease"], use_vmap=use_vmap)
    with pytest.raises(ValueError, match="use_vmap must be 'auto', True or False"):
        model.differential_expression(cells, sample_cov_keys=["disease"], use_vmap="yes")
    with pytest.raises(ValueError, match="use_vmap must be 'auto', True or False"):
        model.get_local_sample_representation(cells, use_vmap=1)
