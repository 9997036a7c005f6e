"""training/standins/medsam.py: click simulation, Dice, batched decoding, resumable training and evaluation of the
MedSAM-like stand-in (on the tiny preset and synthetic cases, so it runs in seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from PRISMRTLib.imaging import Geometry
from PRISMRTLib.models.medsam import MEDSAM_PRESETS, build_medsam
from training.data import STRUCTURES, CTCase
from training.standins import medsam as M


# ---- click simulation ------------------------------------------------------------------------------------------------
def brute_force_inside_distance(mask: np.ndarray) -> np.ndarray:
    """Distance of each mask pixel to the nearest pixel outside it, the border counting as outside (O(n^2))."""
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded)
    out = np.zeros(mask.shape)
    for r, c in np.argwhere(mask):
        out[r, c] = np.sqrt(((outside - (r + 1, c + 1)) ** 2).sum(1)).min()
    return out


def test_inside_distance_is_exact_euclidean():
    rng = np.random.default_rng(3)
    mask = np.zeros((24, 20), bool)
    mask[2:20, 3:17] = True
    mask[rng.random(mask.shape) < 0.08] = False  # holes
    mask[0:5, 0:4] = True  # touches the image border
    np.testing.assert_allclose(M.inside_distance(mask), brute_force_inside_distance(mask), atol=1e-5)
    assert not M.inside_distance(np.zeros((5, 5), bool)).any()


def test_first_click_is_the_interior_point_farthest_from_the_boundary():
    mask = np.zeros((40, 40), bool)
    mask[5:12, 5:30] = True  # thin bar: depth 4
    mask[20:35, 18:33] = True  # square 15 x 15: centre (27, 25), depth 8
    assert M.first_click(mask) == (27, 25)
    # random first clicks (training) stay inside, in the deep half
    rng = np.random.default_rng(0)
    depth = brute_force_inside_distance(mask)
    for _ in range(30):
        r, c = M.first_click(mask, rng)
        assert mask[r, c] and depth[r, c] >= 0.5 * depth.max()
    with pytest.raises(ValueError):
        M.first_click(np.zeros((4, 4), bool))


def test_corrective_click_lands_in_the_largest_error_with_the_right_label():
    target = np.zeros((64, 64), bool)
    target[10:50, 10:50] = True
    # false negative: a 12 x 12 hole in the prediction; false positive: a 4 x 4 blob outside
    pred = target.copy()
    pred[20:32, 30:42] = False
    pred[55:59, 55:59] = True
    r, c, label = M.corrective_click(pred, target)
    assert label == 1 and 20 <= r < 32 and 30 <= c < 42 and not pred[r, c] and target[r, c]
    assert (r, c) in {(25, 35), (25, 36), (26, 35), (26, 36)}  # the hole's centre
    # the other way round: a large false positive outside, a thin false negative at the edge
    pred = target.copy()
    pred[10:50, 10:12] = False
    pred[52:64, 30:45] = True
    r, c, label = M.corrective_click(pred, target)
    assert label == 0 and 52 <= r < 64 and 30 <= c < 45 and pred[r, c] and not target[r, c]
    # random corrective clicks (training): same region, same label
    rng = np.random.default_rng(1)
    for _ in range(20):
        r, c, label = M.corrective_click(pred, target, rng)
        assert label == 0 and pred[r, c] and not target[r, c]
    assert M.corrective_click(target, target) is None


def test_dice_and_boxes_on_hand_computed_cases():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    assert M.dice(a, b) == pytest.approx(0.5)
    assert M.dice(a, a) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0
    assert M.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    big = np.zeros((10, 10), bool)
    big[2:8, 2:8] = True  # 36 px
    small = np.zeros((10, 10), bool)
    small[2:5, 2:5] = True  # 9 px inside
    assert M.dice(big, small) == pytest.approx(2 * 9 / 45)
    mask = np.zeros((30, 40), bool)
    mask[5:12, 20:31] = True
    assert M.tight_box(mask) == (20, 5, 30, 11)  # x0, y0, x1, y1 inclusive
    rng = np.random.default_rng(0)
    boxes = np.array([M.jittered_box(mask, rng) for _ in range(200)])
    assert (np.abs(boxes - [20, 5, 30, 11]) <= 4).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    assert len({tuple(b) for b in boxes}) > 10  # jittered, not fixed


# ---- model ----------------------------------------------------------------------------------------------------------
def test_batched_decode_matches_segment_anything_one_image_at_a_time():
    torch.manual_seed(0)
    model = build_medsam(MEDSAM_PRESETS["tiny"])
    emb = torch.randn(3, 32, 8, 8)
    coords = torch.tensor([[[10.0, 20.0], [40.0, 50.0]], [[60.0, 5.0], [7.0, 90.0]], [[100.0, 100.0], [3.0, 3.0]]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    mask_in = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        low, iou = M.decode(model, emb, points=(coords, labels), mask_input=mask_in, multimask=True)
        for i in range(3):
            sparse, dense = model.prompt_encoder(points=(coords[i:i + 1], labels[i:i + 1]), boxes=None,
                                                 masks=mask_in[i:i + 1])
            ref_low, ref_iou = model.mask_decoder(emb[i:i + 1], model.prompt_encoder.get_dense_pe(), sparse, dense,
                                                  multimask_output=True)
            torch.testing.assert_close(low[i:i + 1], ref_low, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], ref_iou, rtol=1e-5, atol=1e-5)
    assert low.shape == (3, 3, 32, 32)


# ---- training and evaluation on synthetic cases ---------------------------------------------------------------------
def synthetic_case(name: str, shift: int) -> CTCase:
    """A 48 x 48 x 12 'head': soft tissue in air, a bright 'mandible' block and a round 'PTV70' (OpenKBP geometry)."""
    k, j, i = np.mgrid[0:12, 0:48, 0:48]
    hu = np.full(k.shape, -1000, np.int16)
    hu[(j - 24) ** 2 + (i - 24) ** 2 < 20 ** 2] = 30
    ptv = (j - 20 - shift) ** 2 + (i - 22) ** 2 + (2 * (k - 6)) ** 2 < 9 ** 2
    mandible = (j >= 32) & (j < 38) & (i >= 14 + shift) & (i < 34) & (k >= 2) & (k < 9)
    hu[ptv] = 90
    hu[mandible] = 700
    labels = ((ptv.astype(np.uint16) << STRUCTURES.index("PTV70"))
              | (mandible.astype(np.uint16) << STRUCTURES.index("Mandible")))
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((3.906, 3.906, 2.5))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    return CTCase(name, hu, labels.astype(np.uint16), Geometry.from_image(image))


@pytest.fixture(scope="module")
def cases():
    return [synthetic_case("pt_1", 0), synthetic_case("pt_2", 3)]


FAST = dict(batch_size=2, config="tiny", iterations=2, log_every=1, ckpt_every=1, verbose=False)


def test_training_resumes_to_the_same_weights_and_round_trips(tmp_path, cases):
    once = M.train(tmp_path / "once", steps=4, cases=cases, **FAST)
    first = M.train(tmp_path / "split", steps=4, cases=cases, stop_at=2, **FAST)
    assert (tmp_path / "split" / M.CHECKPOINT_NAME).exists()
    assert not (tmp_path / "split" / M.WEIGHTS_NAME).exists()  # not finished yet
    assert torch.load(tmp_path / "split" / M.CHECKPOINT_NAME, weights_only=True)["step"] == 2
    resumed = M.train(tmp_path / "split", steps=4, cases=cases, **FAST)
    a, b = once.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in first.state_dict().items())  # 2 more steps changed something

    import json
    log = json.loads((tmp_path / "split" / M.LOG_NAME).read_text())["log"]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(np.isfinite(e["loss"]) for e in log)

    # the final weights: safetensors with the Sam state dict, loaded back to the same model
    state = load_file(str(tmp_path / "once" / M.WEIGHTS_NAME))
    assert state.keys() == a.keys()
    loaded = M.load_trained(tmp_path / "once")
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)

    # training curves
    pytest.importorskip("matplotlib")
    assert M.plot_log(tmp_path / "split").name == "medsam_curves.png"

    # a checkpoint made with other settings is not silently continued
    with pytest.raises(ValueError, match="other settings"):
        M.train(tmp_path / "split", steps=4, cases=cases, **{**FAST, "iterations": 3})


def test_load_case_reads_the_masks_exactly(tmp_path, cases):
    case = cases[1]
    folder = tmp_path / "pt_7"
    folder.mkdir()
    ct = sitk.GetImageFromArray(case.hu)
    ct.SetSpacing((3.906, 3.906, 2.5))
    ct.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    for name in ("PTV70", "Mandible"):
        mask = sitk.GetImageFromArray((case.labels >> STRUCTURES.index(name) & 1).astype(np.uint8))
        mask.CopyInformation(ct)
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"))
    for _ in range(3):
        (loaded,) = M.load_cases(tmp_path)
        np.testing.assert_array_equal(loaded.labels, case.labels)
        np.testing.assert_array_equal(loaded.hu, case.hu)
    assert loaded.name == "pt_7" and loaded.present == case.present


def test_central_and_largest_axial_slices():
    k, j, i = np.mgrid[0:10, 0:8, 0:8]
    # a cone along the axial axis: area grows with k on slices 2..7 (largest at 7, centre of mass at 5.9 -> 6)
    cone = (k >= 2) & (k <= 7) & (np.abs(j - 4) + np.abs(i - 4) <= k - 2)
    labels = (cone.astype(np.uint16) << STRUCTURES.index("PTV70")).astype(np.uint16)
    image = sitk.GetImageFromArray(np.zeros(k.shape, np.int16))
    case = CTCase("pt_0", np.zeros(k.shape, np.int16), labels, Geometry.from_image(image))
    from PRISMRTLib.imaging import Orientation, SlicePlane
    plane = SlicePlane.create(case.geometry, Orientation.AXIAL)
    areas = [int(np.count_nonzero(plane.extract(labels, n))) for n in range(plane.num_slices)]
    centre = sum(n * a for n, a in enumerate(areas)) / sum(areas)
    assert M.largest_axial_slice(case, "PTV70") == int(np.argmax(areas))
    assert M.central_axial_slice(case, "PTV70") == int(round(centre))
    assert M.central_axial_slice(case, "PTV70") != M.largest_axial_slice(case, "PTV70")
    assert M.central_axial_slice(case, "Larynx") is None


def test_evaluate_reports_clicks_and_box_per_structure(tmp_path, cases):
    assert M.largest_axial_slice(cases[0], "PTV70") == 6 == M.central_axial_slice(cases[0], "PTV70")
    assert M.largest_axial_slice(cases[0], "Brainstem") is None
    torch.manual_seed(0)
    model = build_medsam(MEDSAM_PRESETS["tiny"])
    result = M.evaluate(model, cases)
    assert set(result["per_structure"]) == {"PTV70", "Mandible"}
    for v in result["per_structure"].values():
        assert v["n"] == 2
        assert all(0.0 <= v[k] <= 1.0 for k in ("clicks_1", "clicks_3", "clicks_5", "box"))
    assert len(result["rows"]) == 4
    assert "| PTV70 | 2 |" in result["markdown"] and "5 clicks" in result["markdown"]
    # deterministic
    assert M.evaluate(model, cases)["rows"] == result["rows"]
    assert M.evaluate(model, cases, slice_choice="largest")["slice"] == "axial slice of largest area"
    report = M.write_report(tmp_path, {"central": result}).read_text()
    assert result["markdown"] in report
    assert f"PTV70 from 3 clicks: {result['per_structure']['PTV70']['clicks_3']:.3f}" in report


# ---- propagation-style prompts ----------------------------------------------------------------------------------------
def test_neighbour_slice_keeps_case_orientation_and_mirroring(cases):
    from training.data import SliceSampler, cut_slice

    sampler = SliceSampler(cases, seed=0, size=48, mirror_prob=1.0, orientations=("axial", "coronal"))
    s = sampler.sample(3)
    for offset in (1, -1):
        n = sampler.neighbour(s, offset)
        if n is None:
            continue
        case = next(c for c in cases if c.name == s.case)
        expected = cut_slice(case, s.orientation, s.index + offset, 48, mirror=s.mirrored)
        assert (n.case, n.orientation, n.index, n.mirrored) == (s.case, s.orientation, s.index + offset, s.mirrored)
        np.testing.assert_array_equal(n.labels, expected.labels)
    assert sampler.neighbour(s, 10_000) is None and sampler.neighbour(s, -s.index - 1) is None


def test_propagation_samples_come_from_the_next_slice_and_include_ends(cases):
    """With p_propagate=1 every object is prompted from the sampled slice's mask and judged on its neighbour: the
    target is that neighbour's mask (one slice away, so it overlaps the source), and past the structure's last slice
    the target is empty (the model must learn to stop)."""
    from training.data import SliceSampler

    sampler = SliceSampler(cases, seed=0, size=48, orientations=("axial",))
    empty_targets = 0
    for n in range(60):
        image, masks, rngs, sources = M._sample(sampler, 0, n, 2, p_propagate=1.0)
        again = M._sample(sampler, 0, n, 2, p_propagate=1.0)  # counter-based: same n, same sample
        np.testing.assert_array_equal(image, again[0])
        for target, source in zip(masks, sources):
            assert source is not None and source.sum() >= M.MIN_PIXELS
            if target.any():
                assert M.dice(target, source) > 0.3  # adjacent slices of smooth synthetic structures
            else:
                empty_targets += 1
    assert empty_targets > 0
    # without propagation the objects are prompted by clicks or boxes: no source mask
    _, _, _, sources0 = M._sample(sampler, 0, 5, 2)
    assert sources0 == [None, None]


def test_train_step_handles_propagation_prompts_with_empty_targets(cases):
    from training.data import SliceSampler

    torch.manual_seed(0)
    model = build_medsam(MEDSAM_PRESETS["tiny"])
    sampler = SliceSampler(cases, seed=0, size=model.image_encoder.img_size, orientations=("axial",))
    settings = M.TrainSettings(steps=1, iterations=3, p_propagate=1.0)
    found = None
    for n in range(200):
        item = M._sample(sampler, 0, n, 2, p_propagate=1.0)
        if any(not m.any() for m in item[1]):
            found = item
            break
    assert found is not None
    image, masks, rngs, sources = found
    loss, stats = M.train_step(model, image[None], np.stack(masks), np.zeros(2, int), rngs, settings, sources)
    assert torch.isfinite(loss) and len(stats["dice"]) == 3
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_mask_prompt_is_signed_and_low_res():
    m = np.zeros((48, 48), bool)
    m[10:20, 30:40] = True
    p = M.mask_prompt(m, 24, scale=8.0)
    assert p.shape == (1, 1, 24, 24)
    assert float(p[0, 0, 7, 17]) == 8.0 and float(p[0, 0, 0, 0]) == -8.0  # inside (rows 5-9, cols 15-19), outside


def test_end_samples_step_out_of_a_structure(cases):
    """end_share=1: the first object is prompted from a structure's last slice and judged on the slice beyond it,
    where the structure has ended (empty target) or is about to (a few pixels of its tip)."""
    from training.data import SliceSampler

    sampler = SliceSampler(cases, seed=0, size=48, orientations=("axial",))
    emptied = 0
    for n in range(30):
        _, masks, _, sources = M._sample(sampler, 0, n, 2, p_propagate=1.0, end_share=1.0)
        assert sources[0] is not None and sources[0].sum() >= M.MIN_PIXELS
        assert masks[0].sum() < sources[0].sum()  # walking out of the structure
        emptied += not masks[0].any()
    assert emptied >= 20


def test_fine_tuning_starts_from_a_finished_run(tmp_path, cases):
    base = M.train(tmp_path / "base", steps=1, cases=cases, **FAST)
    tuned = M.train(tmp_path / "tuned", steps=1, cases=cases, init_from=tmp_path / "base", lr=0.0, **FAST)
    a, b = base.state_dict(), tuned.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: nothing moved from the starting weights
    with pytest.raises(FileNotFoundError, match="finish that run first"):
        M.train(tmp_path / "other", steps=1, cases=cases, init_from=tmp_path / "missing", **FAST)


def test_last_slice_follows_mirrored_structure_names(cases):
    """On a mirrored slice the case's LeftParotid is labelled RightParotid; its last slice is still found, and the
    slice beyond it no longer shows it."""
    from training.data import SliceSampler

    base = cases[0]
    left = (base.labels >> STRUCTURES.index("Mandible")) & 1  # reuse the block as a left parotid (k = 2..8)
    case = CTCase("pt_lr", base.hu, (left << STRUCTURES.index("LeftParotid")).astype(np.uint16), base.geometry)
    sampler = SliceSampler([case], seed=0, size=48, orientations=("axial",), mirror_prob=1.0, structure_bias=1.0)
    sample = next(s for s in (sampler.sample(n) for n in range(50)) if "RightParotid" in s.visible(M.MIN_PIXELS))
    assert sample.mirrored
    for step in (1, -1):
        last = sampler.last_slice(sample, "RightParotid", step, M.MIN_PIXELS)
        assert last.mirrored and "RightParotid" in last.visible(M.MIN_PIXELS)
        beyond = sampler.neighbour(last, step)
        assert beyond is None or "RightParotid" not in beyond.visible(M.MIN_PIXELS)


def test_focus_structures_are_shown_and_prompted_first(cases):
    """focus_share=1: every image shows a focus structure and prompts it first, also in propagation and end
    samples; without focus the samples are exactly those of a run that never heard of it."""
    from training.data import SliceSampler

    sampler = SliceSampler(cases, seed=0, size=48, orientations=("axial",), structure_bias=0.0)
    unfocused_first = 0
    for n in range(40):
        _, masks, _, sources = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5,
                                         focus=("PTV70",), focus_share=1.0)
        plain = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5)
        again = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5, focus=(), focus_share=1.0)
        for a, b in zip(plain[1], again[1]):
            np.testing.assert_array_equal(a, b)
        # the first object is the PTV (the synthetic PTV is the round one; the mandible a 6-row block)
        first = sources[0] if sources[0] is not None else masks[0]
        rows = np.flatnonzero(first.any(axis=1))
        unfocused_first += len(rows) and rows[-1] - rows[0] + 1 <= 7
    assert unfocused_first == 0
    with pytest.raises(ValueError, match="unknown structure"):
        M.train("unused", steps=1, cases=cases, focus=("Tumour",), **FAST)
    assert not Path("unused").exists()  # refused before the output folder is made


def test_zoom_crop_enlarges_the_structure_where_it_was():
    """zoom_crop: the window holds the first structure whole, and the enlarged masks are the crop of the originals
    resized (a shifted or transposed window would move them)."""
    size = 64
    mask = np.zeros((size, size), bool)
    mask[40:52, 10:18] = True  # 12 x 8 near the left edge: windows of 24 (the minimum) to 36 pixels
    other = np.zeros((size, size), bool)
    other[0:3, 60:63] = True  # far away: gone from the crop, replaced by the first
    image = np.add.outer(np.arange(size), 100 * np.arange(size)).astype(np.float32)  # row + 100 col
    sides = set()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        r0, c0, side = M.zoom_window(mask, np.random.default_rng(seed))
        assert 0 <= r0 <= 40 and r0 + side >= 52 and 0 <= c0 <= 10 and c0 + side >= 18
        assert 24 <= side <= 36
        sides.add(side)
        zoomed_image, (zoomed, replaced) = M.zoom_crop(image, [mask, other], rng)
        scale = side / size
        # linear enlargement of the linear ramp: pixel (r, c) shows the crop at ((r + .5) s - .5, (c + .5) s - .5)
        r, c = 17, 33
        expected = r0 + (r + 0.5) * scale - 0.5 + 100 * (c0 + (c + 0.5) * scale - 0.5)
        assert abs(zoomed_image[r, c] - expected) < 0.05
        area = zoomed.sum() * scale ** 2
        assert abs(area - mask.sum()) < 0.15 * mask.sum()
        rows, cols = np.nonzero(zoomed)
        assert abs((rows.mean() + 0.5) * scale - 0.5 + r0 - 45.5) < 0.5
        assert abs((cols.mean() + 0.5) * scale - 0.5 + c0 - 13.5) < 0.5
        np.testing.assert_array_equal(replaced, zoomed)
    assert len(sides) > 3  # the window size varies


def test_zoom_share_leaves_other_runs_unchanged_and_zooms_click_images(cases):
    from training.data import SliceSampler

    sampler = SliceSampler(cases, seed=0, size=48, orientations=("axial",), structure_bias=0.0)
    zoomed = 0
    for n in range(30):
        plain = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5)
        again = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5, zoom_share=0.0)
        zoom = M._sample(sampler, 0, n, 2, p_propagate=0.5, end_share=0.5, zoom_share=1.0)
        for a, b in zip(plain[1], again[1]):
            np.testing.assert_array_equal(a, b)
        if plain[3][0] is not None:  # propagation samples are never zoomed
            np.testing.assert_array_equal(zoom[0], plain[0])
        else:
            assert zoom[1][0].sum() >= plain[1][0].sum()  # equal where the window is the whole image
            zoomed += zoom[1][0].sum() > plain[1][0].sum()
    assert zoomed > 5
    with pytest.raises(ValueError, match="zoom_share"):
        M.train("unused", steps=1, cases=cases, zoom_share=1.5, **FAST)
    assert not Path("unused").exists()


def test_weights_move_to_a_finer_patch_grid_exactly(tmp_path):
    """adapt_state_dict: at patch 4 the first layer sees on a slice what the patch-8 model saw on the slice
    upsampled twice; the rest of the network is carried over unchanged and the model runs on the finer grid."""
    import torch.nn.functional as F

    from PRISMRTLib.models.medsam import medsam_input

    torch.manual_seed(0)
    coarse = build_medsam(MEDSAM_PRESETS["standin"])
    fine = build_medsam(MEDSAM_PRESETS["standin_hr"])
    fine.load_state_dict(M.adapt_state_dict(coarse.state_dict(), fine), strict=True)
    x = torch.rand(1, 128, 128)
    with torch.no_grad():
        tokens = fine.image_encoder.patch_embed(medsam_input(x))
        up = F.interpolate(x[None], scale_factor=2, mode="nearest")[0]
        w = coarse.image_encoder.patch_embed.proj
        expected = F.conv2d(medsam_input(up), w.weight, w.bias, stride=8).permute(0, 2, 3, 1)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        assert fine.image_encoder(medsam_input(x)).shape == (1, 128, 32, 32)
    assert torch.equal(fine.mask_decoder.iou_token.weight, coarse.mask_decoder.iou_token.weight)
    other = build_medsam(MEDSAM_PRESETS["tiny"])
    with pytest.raises(ValueError, match="only the patch size"):
        M.adapt_state_dict(coarse.state_dict(), other)
