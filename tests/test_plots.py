"""Plots are written and non-empty: table plots, token-selection overlays, the object-layer probe."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import hiprune
from eval.report import plots, visualize
from eval.report import probe as probe_module
from eval.report import reproduce as R


def _check_image(path):
    assert path.is_file() and path.stat().st_size > 2000, path
    if path.suffix == ".png":
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 5, f"{path} looks blank"


def test_table_plots_are_written_and_non_empty(tmp_path):
    spec = R.load_spec("2", [f"store={tmp_path / 'empty'}"])
    cells = R.collect_cells(spec)
    # stand-in numbers for our side of a few rows (vanilla and HiPrune), so both sides are drawn
    ours = cells["row"].isin(["Vanilla", "HiPrune"])
    cells.loc[ours, "ours"] = cells.loc[ours, "paper"] * 0.98
    cells.loc[ours, "status"] = "ok"
    paths = R.table_plots(spec, cells, tmp_path / "plots")
    assert set(paths) == {f"{name}_llava15_7b.{ext}" for name in ("accuracy_vs_tokens", "pareto_avg_vs_tflops")
                          for ext in ("png", "pdf")}
    for path in paths.values():
        _check_image(path)


def test_paper_points_only_on_the_paper_models_axes_and_long_titles_wrap(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, stem: drawn.append(fig) or [])

    def labels(fig):
        return {text.get_text() for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
                for text in legend.get_texts()}

    assert plots.paper_sides(R.load_spec("2")) == ("ours", "paper")  # drawn by the test above
    for table, paper_shown in (("smoke", False),):
        spec = R.load_spec(table, [f"store={tmp_path / 'empty'}"])
        cells = R.collect_cells(spec)
        ours = cells["row"].isin(["Vanilla", "HiPrune"])
        cells.loc[ours, "ours"] = cells.loc[ours, "paper"] * 0.98
        drawn.clear()
        R.table_plots(spec, cells, tmp_path / table)
        assert len(drawn) == 2  # accuracy vs tokens, Avg vs TFLOPs
        shown = set().union(*(labels(fig) for fig in drawn))
        assert any("ours" in label for label in shown)
        assert any("paper" in label for label in shown) == paper_shown, (table, shown)
        titles = [fig._suptitle.get_text() for fig in drawn if fig._suptitle] + [
            ax.get_title() for fig in drawn for ax in fig.axes if ax.get_title()]
        assert titles and all(len(line) <= 140 for title in titles for line in title.splitlines())
    assert max(len(line) for line in plots.wrap("word " * 40, 30).splitlines()) <= 30


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 90.0), (2.0, 95.0), (2.5, 94.0), (3.0, 99.0), (3.5, 98.0), (8.0, 100.0)]
    assert plots.pareto_front(points) == [(1.0, 90.0), (2.0, 95.0), (3.0, 99.0), (8.0, 100.0)]


@pytest.fixture(scope="module")
def scene():
    image = Image.new("RGB", (300, 200), (40, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse([20, 20, 150, 150], fill="red")
    mask = Image.new("L", (300, 200), 0)
    ImageDraw.Draw(mask).ellipse([20, 20, 150, 150], fill=255)
    return image, mask


def test_overlay_of_hiprune_roles_and_of_a_plain_kept_set(tiny_llava, scene, tmp_path):
    model, processor = tiny_llava
    image, _ = scene
    result = visualize.select_tokens(model, processor, hiprune.build_method("hiprune", budget=64), image)
    assert result["grid"] == (24, 24) and len(result["indices"]) == 64
    roles = result["roles"]
    assert len(roles["anchor"]) == 1 and 1 <= len(roles["buffer"]) <= 4
    assert len(roles["anchor"]) + len(roles["buffer"]) + len(roles["register"]) == 64
    assert result["image"].shape == (336, 336, 3) and 0 <= result["image"].min() <= result["image"].max() <= 1
    paths = plots.save_figure(visualize.overlay(result["image"], result["grid"], result["indices"], roles, "hiprune"),
                           tmp_path / "hiprune")
    for path in paths:
        _check_image(path)

    plain = visualize.select_tokens(model, processor, hiprune.build_method("none"), image)
    assert len(plain["indices"]) == 576 and plain["roles"] == {}


def test_visualize_cli(tiny_llava_dir, scene, tmp_path):
    image_path = tmp_path / "scene.png"
    scene[0].save(image_path)
    paths = visualize.main([f"image={image_path}", "model=tiny_llava", "method=random", "budget=32", "device=cpu",
                            f"out={tmp_path / 'random'}"])
    assert [p.name for p in paths] == ["random.png", "random.pdf"]
    for path in paths:
        _check_image(path)
    with pytest.raises(SystemExit, match="image=PATH is required"):
        visualize.main(["model=tiny_llava"])


def test_object_layer_probe_on_the_tiny_model(tiny_llava, scene, shape_images, tmp_path):
    model, processor = tiny_llava
    images = [scene[0], *shape_images]
    masks = [scene[1], None, None, None]
    result = probe_module.probe(model, processor, images, top=0.1, masks=masks, batch_size=3)
    assert result.layers == list(range(1, 13)) and result.n_images == 4 and result.top_k == 57
    assert all(np.isfinite(result.dispersion)) and min(result.dispersion) > 0
    overlap = np.array(result.overlap)
    assert overlap.shape == (12, 12) and np.allclose(np.diag(overlap), 1.0) and np.allclose(overlap, overlap.T)
    assert len(result.mask_iou) == 12 and all(0 <= v <= 1 for v in result.mask_iou)
    assert 1 <= result.suggested_layer <= 11
    written = probe_module.plot(result, tmp_path, "tiny") + probe_module.write(result, tmp_path)
    for path in written:
        if path.suffix in (".png", ".pdf"):
            _check_image(path)
        else:
            assert path.stat().st_size > 100
    assert (tmp_path / "probe.csv").read_text().count("\n") == 13


def test_probe_helpers():
    assert probe_module.suggest_object_layer([1.0, 1.1, 1.0, 3.0, 3.2]) == 3  # the rise is from layer 3 to 4
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 49, 99], fill=255)  # left half
    patches = probe_module.mask_patches(mask, (4, 4))
    assert patches == {r * 4 + c for r in range(4) for c in (0, 1)}
    wide = Image.new("L", (200, 100), 255)  # padded to 200 x 200: the middle rows are object
    assert probe_module.mask_patches(wide, (4, 4)) == {r * 4 + c for r in (1, 2) for c in range(4)}
    with pytest.raises(ValueError, match="fraction"):
        probe_module.probe(None, None, [], top=0)


def test_probe_cli(tiny_llava_dir, shape_images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(shape_images):
        image.save(folder / f"{i}.png")
    whole = (folder / "0.png").read_bytes()
    (folder / "9_truncated.png").write_bytes(whole[: len(whole) // 2])  # decoded partly black if not checked
    (folder / "9_text.png").write_text("not an image")
    result = probe_module.main(["--images", str(folder), "--model", "tiny_llava", "--device", "cpu",
                                "--out", str(tmp_path / "out")])
    assert result.n_images == 3
    assert sum("skipped unreadable image" in note for note in result.notes) == 2
    assert any("only 3 image(s)" in note for note in result.notes)
    assert probe_module.sample_warnings(50, 576, 0.05) == []
    assert "2 are used" in probe_module.sample_warnings(50, 16, 0.05)[0]
    for name in ("dispersion.png", "overlap.pdf", "probe.json"):
        assert (tmp_path / "out" / name).stat().st_size > 100


def _harness(dir_fixture_value, *overrides):
    from eval.config import compose_config
    from eval.running.methods import build_from_config

    cfg = compose_config([*overrides, "device=cpu"])
    method = build_from_config(cfg.method, cfg.budget)
    return cfg, method, visualize.load_harness_model(cfg, method)


def _tokens_drawn(trace):
    return sum(tile.rows * tile.cols for panel in trace.panels for tile in panel.tiles)


def test_overlay_draws_each_family_as_it_is(tiny_llava_next_dir, tiny_qwen_dir, tiny_video_llava_dir, scene,
                                            tmp_path):
    image = scene[0]
    # LLaVA-NeXT: the base image and the anyres crops in their tiling, one grid per crop of the layout that ran
    _, method, lm = _harness(tiny_llava_next_dir, "model=tiny_llava_next", "method=hiprune", "budget=40")
    trace = visualize.trace(lm, image)
    layout = lm.session.adapter.image_layout(torch.tensor(image.size[::-1]), method)
    lm.close()
    assert [p.title.split(" (")[0] for p in trace.panels] == [
        "base image", f"{layout.crop_grid[0]} x {layout.crop_grid[1]} crops"]
    assert "official layout" in trace.panels[0].title
    assert len(trace.panels[0].tiles) == 1 and len(trace.panels[1].tiles) == layout.crops - 1
    assert sum(len(g.kept) for g in trace.grids) == sum(layout.kept)
    assert all(g.roles.keys() <= g.kept for g in trace.grids) and any(g.roles for g in trace.grids)
    _check_image(plots.save_figure(visualize.draw(trace, "next"), tmp_path / "next")[0])
    # Qwen2.5-VL: the resized image with its merged grid (it used to crash)
    _, _, lm = _harness(tiny_qwen_dir, "model=tiny_qwen25vl", "method=random", "budget=0.25")
    trace = visualize.trace(lm, image)
    lm.close()
    (panel,) = trace.panels
    (tile,) = panel.tiles
    assert panel.image.shape[:2] == (tile.rows * 28, tile.cols * 28)
    assert len(trace.grids[0].kept) == round(0.25 * tile.rows * tile.cols)
    _check_image(plots.save_figure(visualize.draw(trace, "qwen"), tmp_path / "qwen")[0])
    # Video-LLaVA: one panel per frame
    frames = np.stack([np.asarray(image.resize((64, 64))).copy() for _ in range(4)])
    _, _, lm = _harness(tiny_video_llava_dir, "model=tiny_video_llava", "method=hiprune", "budget=32")
    trace = visualize.trace(lm, visualize.VideoClip(frames))
    lm.close()
    assert [p.title for p in trace.panels] == ["frame 1", "frame 2", "frame 3", "frame 4"]
    assert sum(len(g.kept) for g in trace.grids) == 32 and _tokens_drawn(trace) == 4 * trace.grids[0].tokens


def test_overlay_shows_merges_and_in_llm_drops(tiny_llava_dir, scene):
    image = scene[0]
    for name, budget in (("tome", 64), ("visionzip", 32), ("trim", 32)):
        _, _, lm = _harness(tiny_llava_dir, "model=tiny_llava", f"method={name}", f"budget={budget}")
        trace = visualize.trace(lm, image, "Is there a red circle?")
        lm.close()
        (grid,) = trace.grids
        record_sources = grid.groups
        merged = {t for members in record_sources.values() for t in members}
        assert record_sources and set(record_sources) <= grid.kept, name
        # every patch is accounted for: kept alone, or merged into a kept token (no patch lost for a merging method)
        assert grid.kept | merged == set(range(576)), name
        if name == "trim":
            assert "aggregate" in grid.roles.values()
    _, _, lm = _harness(tiny_llava_dir, "model=tiny_llava", "method=fastv", "budget=32",
                               "method.options.layer=1", "method.options.budget_mode=keep_after")
    trace = visualize.trace(lm, image)
    lm.close()
    (grid,) = trace.grids
    assert len(grid.kept) == 32 and set(grid.shade.values()) == {"dropped at decoder layer 1"}
    assert len(grid.shade) == 576 - 32 and "before its first drop" in trace.notes[-1]


def test_overlay_files_are_named_after_model_method_and_budget(tmp_path):
    from eval.config import compose_config

    cfg = compose_config(["model=tiny_llava", "method=hiprune", "budget=32"])
    stem = visualize.output_stem(tmp_path / "photo.jpg", cfg, hiprune.build_method("hiprune", budget=32))
    assert stem.name == "photo_tiny_llava_hiprune_32"
    assert visualize.output_stem(tmp_path / "photo.jpg", cfg, hiprune.build_method("none")).name == (
        "photo_tiny_llava_none_full")
