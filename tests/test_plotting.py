"""Figures read like a biologist would read them: comparable scales, significance on the volcano's
y axis, clipped ranges marked, nothing drawn over the data. Rendered with Agg, checked on artists."""

import matplotlib

matplotlib.use("Agg")

import anndata  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from mrvi_pyro import pl, plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def grouped_distances() -> xr.DataArray:
    """Two groups of 6 samples: 'null' with distances <= 0.12, 'affected' with distances up to 1.2."""
    rng = np.random.default_rng(0)
    blocks = []
    for scale in (0.12, 1.2):
        points = rng.normal(size=(6, 3))
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        blocks.append(scale * d / d.max())
    samples = [f"s{i}" for i in range(6)]
    return xr.DataArray(np.stack(blocks), dims=("cell_type_name", "sample_x", "sample_y"),
                        coords={"cell_type_name": ["null", "affected"], "sample_x": samples, "sample_y": samples})


def heat_image(fig):
    return [im for ax in fig.axes for im in ax.get_images() if im.get_array().shape == (6, 6)][0]


def test_sample_distance_heatmaps_share_one_colour_scale_by_default():
    distances = grouped_distances()
    null = heat_image(plotting.sample_distance_heatmap(distances, group="null"))
    affected = heat_image(plotting.sample_distance_heatmap(distances, group="affected"))
    assert null.get_clim() == affected.get_clim() == pytest.approx((0.0, 1.2))
    own = heat_image(plotting.sample_distance_heatmap(distances, group="null", vmax="group"))
    assert own.get_clim() == pytest.approx((0.0, 0.12))
    assert heat_image(plotting.sample_distance_heatmap(distances, group="null", vmax=2.0)).get_clim() == (0.0, 2.0)
    with pytest.raises(ValueError, match="vmax must be 'shared', 'group' or a positive number"):
        plotting.sample_distance_heatmap(distances, group="null", vmax="global")
    for bad in ([1.0], 0.0, float("nan")):
        with pytest.raises(ValueError, match="vmax must be"):
            plotting.sample_distance_heatmap(distances, group="null", vmax=bad)


def test_a_column_named_twice_gets_one_colour_bar_and_one_legend_entry():
    info = pd.DataFrame({"disease": ["a", "b"] * 3}, index=[f"s{i}" for i in range(6)])
    fig = plotting.sample_distance_heatmap(grouped_distances(), group="affected", sample_info=info,
                                           color_by=["disease", "disease"])
    assert len(fig.axes) == 4  # dendrogram, one colour bar, heatmap, scale
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["disease", "a", "b"]


def de_table() -> pd.DataFrame:
    """Two groups: 'null' (|lfc| <= 0.05, pde ~ 0) and 'affected' (|lfc| up to 2, pde up to 1)."""
    rng = np.random.default_rng(1)
    frames = []
    for group, scale in (("null", 0.05), ("affected", 2.0)):
        lfc = rng.uniform(-scale, scale, 60)
        pde = np.clip(np.abs(lfc) / 2.0, 0, 1)
        pde[:3] = 1.0 if group == "affected" else pde[:3]  # saturated: every draw beyond delta
        table = pd.DataFrame({"group": group, "covariate": "disease", "gene": [f"g{i}" for i in range(60)],
                              "lfc_mean": lfc, "pde_mean": pde})
        table = table.iloc[np.argsort(-np.abs(lfc))]
        table.insert(3, "rank", np.arange(1, 61))
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def test_volcano_shows_significance_on_shared_axes_with_few_non_overlapping_labels():
    table = de_table()
    fig = plotting.volcano(table, n_label=40)
    null, affected = fig.axes[:2]
    assert null.get_xlim() == affected.get_xlim() and null.get_xlim()[1] >= 1.9  # null genes look flat
    assert null.get_ylim() == affected.get_ylim()
    assert null.get_ylabel().startswith("-log10(1 - mean P(|lfc| >= delta))")
    ys = np.concatenate([c.get_offsets()[:, 1] for c in affected.collections if isinstance(c, PathCollection)])
    finite = table[table.group == "affected"]
    floor = (1 - finite.pde_mean)[(1 - finite.pde_mean) > 0].min()
    assert ys.max() == pytest.approx(-np.log10(floor))  # saturated genes sit at the resolution floor
    assert any(c.get_paths() and isinstance(c, PathCollection) and len(c.get_offsets()) == 3
               for c in affected.collections)  # the 3 saturated genes drawn apart (triangles)
    renderer = fig.canvas.get_renderer()
    for ax in (null, affected):
        texts = ax.texts
        assert 1 <= len(texts) <= 40
        boxes = [t.get_window_extent(renderer) for t in texts]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
        panel = ax.get_window_extent(renderer)
        assert all(panel.x0 <= b.x0 and b.x1 <= panel.x1 for b in boxes)  # no name leaves its panel
    default = plotting.volcano(table)
    assert max(len(ax.texts) for ax in default.axes) <= 10


def test_volcano_reads_p_value_columns_at_the_accuracy_floor():
    table = de_table().assign(padj=lambda t: np.where(t["rank"] <= 2, 0.0, 0.5))
    fig = plotting.volcano(table, y="padj")
    ys = np.concatenate([c.get_offsets()[:, 1] for c in fig.axes[0].collections])
    assert ys.max() == pytest.approx(7.0) and fig.axes[0].get_ylabel() == "-log10 padj"
    with pytest.raises(ValueError, match="not a probability"):
        plotting.volcano(table.assign(lfc_std_mean=3.0), y="lfc_std_mean")


def test_effect_size_map_clips_padj_at_the_p_value_accuracy():
    n = 50
    padj = np.full((n, 1), 0.5)
    padj[:5] = 0.0  # not resolved below ~1e-7
    de = xr.Dataset({"effect_size": (("cell_name", "covariate"), np.ones((n, 1))),
                     "padj": (("cell_name", "covariate"), padj)}, coords={"covariate": ["disease"]})
    fig = plotting.effect_size_embedding(de, np.random.default_rng(0).normal(size=(n, 2)))
    panel = fig.axes[1]
    assert "clipped at 1e-07" in panel.get_title()
    assert panel.collections[0].get_array().max() == pytest.approx(7.0)


def test_da_violins_clip_the_y_range_and_mark_the_clipped_cells():
    rng = np.random.default_rng(2)
    values = rng.normal(0.0, 1.0, 400)
    values[:4] = -40.0  # a few extreme cells
    groups = np.repeat(["A", "B"], 200)
    summary = xr.Dataset({"log_ratio": ("cell_name", values)}, attrs={"group1": "disease", "group2": "healthy"})
    fig = plotting.log_ratio_by_group(summary, groups)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert -5 < low < -2 and 2 < high < 5
    edge_low, edge_high = np.quantile(values, [0.01, 0.99])
    marked = {(float(c.get_offsets()[0, 0]), float(c.get_offsets()[0, 1])): int(t.get_text())
              for c, t in zip([c for c in ax.collections if isinstance(c, PathCollection)], ax.texts)}
    expected = {}
    for x, name in enumerate(["A", "B"]):
        part = values[groups == name]
        for edge, count in ((edge_low, (part < edge_low).sum()), (edge_high, (part > edge_high).sum())):
            if count:
                expected[(float(x), float(edge))] = int(count)
    assert marked == pytest.approx(expected) and marked[(0.0, float(edge_low))] >= 4  # the -40 cells
    full = plotting.log_ratio_by_group(summary, groups, clip_quantiles=None)
    assert full.axes[0].get_ylim()[0] < -40


def test_embedding_draws_in_random_order_with_the_legend_outside():
    n = 300
    obs = pd.DataFrame({"sample": pd.Categorical(np.repeat(["a", "b", "c"], n // 3))})
    coords = np.random.default_rng(3).normal(size=(n, 2))
    fig = plotting.embedding(coords, obs, "sample")
    ax = fig.axes[0]
    points = ax.collections[0]
    drawn = points.get_offsets()
    assert len(ax.collections) == 1 and len(drawn) == n
    last_drawn = [np.flatnonzero((coords == p).all(1))[0] for p in drawn[-n // 3:]]
    assert len(set(obs["sample"].to_numpy()[last_drawn])) == 3  # the last third is not one sample
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # legend right of the data panel
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]


def test_basis_coords_read_any_obsm_key_and_fall_back_to_pca():
    adata = anndata.AnnData(np.zeros((20, 3), dtype=np.float32))
    umap = np.random.default_rng(4).normal(size=(20, 2))
    adata.obsm["X_umap"] = umap
    coords, name = plotting.basis_coords(adata, "X_umap")
    np.testing.assert_array_equal(coords, umap)
    assert name == "UMAP"
    latent = np.random.default_rng(5).normal(size=(20, 4))
    coords, name = plotting.basis_coords(adata, latent=latent)
    np.testing.assert_allclose(coords, plotting.pca_2d(latent))
    assert name == "PC"
    with pytest.raises(ValueError, match="'X_tsne' is not a key of adata.obsm.*X_umap"):
        plotting.basis_coords(adata, "X_tsne")
    fig = plotting.embedding(*plotting.basis_coords(adata, "X_umap")[:1], pd.DataFrame({"v": np.arange(20.0)}), "v",
                             basis_name="UMAP")
    assert fig.axes[0].get_xlabel() == "UMAP1"


# ----- the pl subpackage: scanpy-style calls, one-way imports, the plotting alias ----------------
def test_plotting_is_the_pl_subpackage_under_its_earlier_name():
    assert plotting.__all__ == pl.__all__
    for name in pl.__all__:
        assert getattr(plotting, name) is getattr(pl, name), name


def test_pl_modules_import_one_way_and_never_the_plotting_alias():
    import ast
    import pathlib
    import subprocess
    import sys

    folder = pathlib.Path(pl.__file__).parent
    allowed = {"_base": set(), "_embedding": {"_base"}, "_de": {"_base", "_embedding"},
               "_da": {"_base"}, "_explore": {"_base", "_embedding"}, "_criticism": {"_base"}}
    assert {p.stem for p in folder.glob("_*.py")} - {"__init__"} == set(allowed)
    for path in (folder / f"{name}.py" for name in allowed):
        siblings = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                siblings.add(node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module is None or "plotting" not in node.module, path.name
                assert all(alias.name != "plotting" for alias in node.names), path.name
        assert siblings <= allowed[path.stem], (path.name, siblings)
    code = "import sys, mrvi_pyro.pl; assert 'mrvi_pyro.plotting' not in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def cells() -> anndata.AnnData:
    """60 cells of two types with a UMAP-like 2-d embedding and a 5-d latent."""
    rng = np.random.default_rng(6)
    adata = anndata.AnnData(np.zeros((60, 3), dtype=np.float32))
    adata.obs["cell_type"] = pd.Categorical(np.repeat(["A", "B"], 30))
    adata.obs["score"] = rng.normal(size=60)
    adata.obsm["X_umap"] = rng.normal(size=(60, 2))
    adata.obsm["X_mrvi_u"] = rng.normal(size=(60, 5))
    return adata


def test_embedding_takes_adata_basis_color_ax_and_show(monkeypatch):
    adata = cells()
    fig = pl.embedding(adata, "X_umap", color=["cell_type", "score"])
    assert [ax.get_xlabel() for ax in fig.axes[:2]] == ["UMAP1", "UMAP1"]
    drawn = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(drawn[:, 0]), np.sort(adata.obsm["X_umap"][:, 0]))
    earlier = plotting.embedding(adata.obsm["X_umap"], adata.obs, ["cell_type", "score"], basis_name="UMAP")
    np.testing.assert_array_equal(earlier.axes[0].collections[0].get_offsets(), drawn)  # same cells, same order
    projected = pl.embedding(adata, color="score", latent=adata.obsm["X_mrvi_u"])
    np.testing.assert_allclose(np.sort(projected.axes[0].collections[0].get_offsets()[:, 0]),
                               np.sort(pl.pca_2d(adata.obsm["X_mrvi_u"])[:, 0]))
    own_fig, ax = plt.subplots()
    assert pl.embedding(adata, "X_umap", color="cell_type", ax=ax) is own_fig
    assert len(ax.collections) == 1 and ax.get_title() == "cell_type"
    with pytest.raises(ValueError, match="ax= holds one panel, but color names 2 columns"):
        pl.embedding(adata, "X_umap", color=["cell_type", "score"], ax=ax)
    with pytest.raises(ValueError, match="basis= and latent= select coordinates of an AnnData"):
        pl.embedding(adata.obsm["X_umap"], "X_umap", color="cell_type")
    with pytest.raises(ValueError, match="'tissue'.*not in obs"):
        pl.embedding(adata, "X_umap", color="tissue")
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(True))
    assert pl.embedding(adata, "X_umap", color="cell_type", show=True) is None and shown == [True]
    assert pl.embedding(adata, "X_umap", show=False).axes[0].get_xlabel() == "UMAP1"  # no color: one grey panel


def test_result_figures_draw_on_an_adata_basis_or_into_an_axes():
    adata = cells()
    n = adata.n_obs
    de = xr.Dataset({"effect_size": (("cell_name", "covariate"), np.linspace(0, 3, n)[:, None]),
                     "padj": (("cell_name", "covariate"), np.full((n, 1), 0.01))}, coords={"covariate": ["disease"]})
    fig = pl.effect_size_embedding(de, adata, basis="X_umap", color="cell_type")
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()] == ["UMAP1"] * 3
    with pytest.raises(ValueError, match="DE result has 60 cells but 10 are drawn"):
        pl.effect_size_embedding(de, adata[:10], basis="X_umap")
    summary = xr.Dataset({"log_ratio": ("cell_name", np.linspace(-2, 2, n))}, attrs={"group1": "d", "group2": "h"})
    fig = pl.log_ratio_summary(summary, adata, groupby="cell_type", basis="X_umap")
    assert fig.axes[0].get_xlabel() == "UMAP1" and [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["A", "B"]
    with pytest.raises(ValueError, match="groupby 'tissue' is not a column of obs"):
        pl.log_ratio_summary(summary, adata, groupby="tissue", basis="X_umap")
    by_group = pl.log_ratio_by_group(summary, adata, groupby="cell_type")
    assert [t.get_text() for t in by_group.axes[0].get_xticklabels()] == ["A", "B"]
    fig, (left, right) = plt.subplots(1, 2)
    assert pl.log_ratio_embedding(summary["log_ratio"], adata, basis="X_umap", ax=left) is fig
    assert pl.local_distance_embedding(adata, np.arange(n, dtype=float), basis="X_umap", ax=right) is fig
    assert right.get_title() == "mean local sample distance" and len(fig.axes) == 4  # two panels, two colour bars
    table = de_table()
    fig, ax = plt.subplots()
    assert pl.volcano(table, groups=["affected"], ax=ax) is fig and ax.get_title() == "Volcano: disease, affected"
    with pytest.raises(ValueError, match="ax= holds one panel, but 2 groups"):
        pl.volcano(table, ax=ax)
    fig, ax = plt.subplots()
    assert pl.top_genes_heatmap(table, n_genes=2, ax=ax) is fig and len(ax.get_images()) == 1


def test_training_history_reads_a_model_or_its_history():
    history = pd.DataFrame({"elbo_train": [3.0, 2.0, 1.5], "elbo_validation": [3.1, 2.2, 1.9]})

    class Trained:
        pass

    model = Trained()
    model.history = history
    ax = pl.training_history(model).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [3.1, 2.2, 1.9])
    assert len(ax.figure.axes) == 1  # no spread column, no second axis
    model.history = history.assign(sample_spread=[0.1, 0.2, 0.25])
    figure = pl.training_history(model)
    np.testing.assert_array_equal(figure.axes[1].lines[0].get_ydata(), [0.1, 0.2, 0.25])
    assert figure.axes[1].get_ylabel() == "sample spread (dashed)"
    model.history = history.assign(sample_spread=[0.1, 0.2, 0.25], batch_share=[0.9, 0.5, 0.2],
                                   batch_share_chance=[0.1, 0.1, 0.1])
    figure = pl.training_history(model)
    assert len(figure.axes) == 3
    np.testing.assert_array_equal(figure.axes[2].lines[0].get_ydata(), [0.9, 0.5, 0.2])
    assert figure.axes[2].get_ylim() == (0, 1) and figure.axes[2].lines[1].get_ydata()[0] == 0.1
    model.history = None
    with pytest.raises(ValueError, match="an untrained model has no history"):
        pl.training_history(model)


def test_every_figure_function_follows_the_pl_conventions():
    import inspect

    helpers = {"P_VALUE_FLOOR", "basis_coords", "pca_2d", "da_log_ratio"}
    first = {"adata", "de", "summary", "distances", "log_ratio", "history"}
    single_panel = {"embedding", "training_history", "top_genes_heatmap", "volcano", "log_ratio_embedding",
                    "log_ratio_by_group", "local_distance_embedding", "sample_mixing_heatmap"}
    for name in sorted(set(pl.__all__) - helpers):
        function = getattr(pl, name)
        parameters = inspect.signature(function).parameters
        assert function.__doc__ and "show" in function.__doc__, name
        assert next(iter(parameters)) in first, name  # the AnnData or the result first
        assert parameters["show"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["show"].default is None, name
        assert ("ax" in parameters) == (name in single_panel), name


def test_sample_mixing_heatmap_shows_the_excess_and_frames_the_kept_rows():
    table = pd.DataFrame({
        "group": ["t0", "t0", "t1", "t1", "all", "all"],
        "covariate": ["sample", "disease"] * 3,
        "excess": [0.02, 1.0, np.nan, 0.1, 0.03, 0.3],
        "kept": [False, True, False, False, False, False],
    })
    fig = pl.sample_mixing_heatmap(table)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.get_images()[0].get_array().filled(np.nan),
                                  [[0.02, 1.0], [np.nan, 0.1], [0.03, 0.3]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["t0", "t1", "all"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sample", "disease"]
    assert sorted(t.get_text() for t in ax.texts) == ["0.02", "0.03", "0.10", "0.30", "1.00"]  # NaN: blank
    frames = [p for p in ax.patches if not p.get_fill()]
    assert len(frames) == 1 and frames[0].get_xy() == (0.5, -0.5)  # (t0, disease)
    _, own = plt.subplots()
    assert pl.sample_mixing_heatmap(table, ax=own).axes[0] is own
    with pytest.raises(ValueError, match=r"summary lacks column\(s\) \['kept'\]"):
        pl.sample_mixing_heatmap(table.drop(columns="kept"))


def ppc_table(interval: float = 0.9) -> pd.DataFrame:
    """A posterior predictive check table of 40 genes: replicated values around the observed ones,
    the first 10 genes of every statistic outside their band."""
    rng = np.random.default_rng(3)
    frames = []
    for name in ("mean", "variance", "zero_fraction", "cv"):
        observed = rng.uniform(0.1, 5.0, 40) if name != "zero_fraction" else rng.uniform(0.05, 0.95, 40)
        low, high = observed * 0.9, observed * 1.1
        observed = observed.copy()
        observed[:10] *= 1.5
        frames.append(pd.DataFrame({"statistic": name, "gene": [f"g{i}" for i in range(40)], "observed": observed,
                                    "replicated": (low + high) / 2, "low": low, "high": high,
                                    "inside": (observed >= low) & (observed <= high), "ppp": 0.5}))
    table = pd.concat(frames, ignore_index=True)
    table.attrs["interval"] = interval
    return table


def test_posterior_predictive_check_draws_one_panel_per_statistic_with_its_coverage():
    table = ppc_table()
    fig = pl.posterior_predictive_check(table)
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "mean: 75% inside of the 90% band"
    assert titles[2].startswith("zero fraction: 75% inside")
    assert fig.axes[0].get_xscale() == "log" and fig.axes[2].get_xscale() == "linear"
    plt.close(fig)
    fig = pl.posterior_predictive_check(table, "variance")
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "observed variance"
    plt.close(fig)
    with pytest.raises(ValueError, match=r"statistics \['skew'\] not in the table"):
        pl.posterior_predictive_check(table, ["mean", "skew"])
    with pytest.raises(ValueError, match="posterior_predictive_check"):
        pl.posterior_predictive_check(table.drop(columns="inside"))
