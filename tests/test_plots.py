"""Figures are written as images and Markdown tables show undefined values as n/a."""

import numpy as np

from emjax import plots


def test_plots_and_markdown(tmp_path):
    rows = [
        {"layer": 3, "inducing": (0.3, 0.25, 0.35), "control": (0.2, 0.15, 0.24), "null": (0.18, 0.1, 0.2)},
        {"layer": 6, "inducing": (0.25, 0.2, 0.3), "control": (0.22, 0.2, 0.25), "null": (0.19, 0.1, 0.2)},
    ]
    plots.plot_layer_proximity(rows, tmp_path / "layers.png", title="t")
    groups = {"inducing": np.random.rand(50), "control": np.ma.masked_array([0.1, 0.2], [0, 1])}
    plots.plot_max_cosine_histograms(groups, tmp_path / "hist.png")
    for name in ("layers.png", "hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = plots.markdown_table(
        [{"layer": 3, "effect": 0.12345, "set": "a|b"}, {"layer": 6, "effect": float("nan"), "set": "c"}]
    )
    assert table == "| layer | effect | set |\n|---:|---:|---|\n| 3 | 0.123 | a\\|b |\n| 6 | n/a | c |\n"


def test_dose_and_scatter_plots_are_images(tmp_path):
    points = [{"layer": layer, "update_norm": u, "error": 0.1 * u, "null_error": 0.9}
              for layer in (3, 6) for u in (1, 2)]  # fmt: skip
    plots.plot_dose(points, tmp_path / "dose.png")
    plots.plot_scatter([0.0, 1.0, 2.0], [0.1, 0.9, 2.2], tmp_path / "scatter.png", xlabel="x", ylabel="y",
                       highlight=[1])  # fmt: skip
    for name in ("dose.png", "scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
