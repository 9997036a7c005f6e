"""training/standins/dinov3.py: MIND-SSC, the nearest-neighbour matching scorer, view correspondences, masked
encoding, bit-for-bit resume and the exported weights loading strictly into build_dinov3 (all on synthetic data)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from PRISMRTLib.imaging import Geometry
from PRISMRTLib.models.dinov3 import DINOV3_PRESETS, build_dinov3, dinov3_features, dinov3_input
from training.data import STRUCTURES, CTCase
from training.standins import dinov3 as sd

TINY = DINOV3_PRESETS["tiny"]  # 128 px, patch 16: an 8 x 8 grid
SMALL_SSL = sd.SSLConfig(cls_prototypes=16, patch_prototypes=16, head_hidden=32, head_bottleneck=16, proj_dim=16,
                         checkpoint_every=1000, mask_prob=1.0, nce_exclusion=0.5)  # 4 x 4 crops: keep negatives


def bit(name: str) -> int:
    return 1 << STRUCTURES.index(name)


def synthetic_case(name: str = "pt_1", seed: int = 0, shift: int = 0, slices: int = 6) -> CTCase:
    """A 'head': textured ellipse of soft tissue with a bony ring (Mandible) and two parotids, air outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:128]
    yy, xx = yy - 64, xx - 64 - shift
    head = (yy / 40.0) ** 2 + (xx / 32.0) ** 2 < 1
    ring = head & ((yy / 30.0) ** 2 + (xx / 24.0) ** 2 > 0.8) & (yy < -5)
    right = (yy - 8) ** 2 + (xx + 18) ** 2 < 64  # image left = patient right
    left = (yy - 8) ** 2 + (xx - 18) ** 2 < 64
    hu = np.full((slices, 128, 128), -1000.0)
    labels = np.zeros((slices, 128, 128), np.uint16)
    for k in range(slices):
        sl = np.where(head, 40.0, -1000.0) + np.where(head, rng.normal(0, 30, (128, 128)), 0)
        sl[ring] += 800
        sl[right | left] -= 80
        hu[k] = sl
        if 0 < k < slices - 1:
            labels[k][ring] |= bit("Mandible")
            labels[k][right] |= bit("RightParotid")
            labels[k][left] |= bit("LeftParotid")
    geometry = Geometry(size=(128, 128, slices), spacing=np.array([4.0, 4.0, 3.0]), origin=np.zeros(3),
                        direction=np.diag([1.0, 1.0, -1.0]))
    return CTCase(name, hu.astype(np.int16), labels, geometry)


# --- MIND-SSC ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(3)
    k, j, i = np.mgrid[0:10, 0:24, 0:20]
    vol = 100.0 * (i > 9) + 40.0 * np.sin(j / 3.0) + rng.normal(0, 5, (10, 24, 20))
    return vol.astype(np.float32)


def test_mind_ssc_shape_range_and_twelve_pairs(volume):
    assert len(sd.SSC_PAIRS) == 12  # the 6-neighbourhood's pairs at squared distance 2 (opposites excluded)
    mind = sd.mind_ssc(volume)
    assert mind.shape == (12,) + volume.shape and mind.dtype == np.float32
    assert mind.min() > 0 and np.allclose(mind.max(axis=0), 1.0)  # each voxel's closest pair is exp(0)
    with pytest.raises(ValueError, match="3D"):
        sd.mind_ssc(volume[0])


def test_mind_ssc_invariant_to_intensity_offset_and_scale(volume):
    mind = sd.mind_ssc(volume)
    np.testing.assert_allclose(sd.mind_ssc(volume + 1000.0), mind, atol=2e-4)
    np.testing.assert_allclose(sd.mind_ssc(3.5 * volume - 200.0), mind, atol=2e-4)
    # but not to the image's structure: a different image gives a different descriptor
    assert np.abs(sd.mind_ssc(volume[:, ::-1].copy())[:, :, ::-1] - mind).max() > 0.1


def test_mind_ssc_equivariant_to_swapping_axes(volume):
    """Swapping the j and i axes permutes the 12 channels the way it permutes the neighbour pairs."""
    swap = sd.SIX_NEIGHBOURHOOD[:, [0, 2, 1]]
    index = {tuple(v): n for n, v in enumerate(sd.SIX_NEIGHBOURHOOD)}
    perm = []
    for a, b in sd.SSC_PAIRS:
        pair = tuple(sorted((index[tuple(swap[a])], index[tuple(swap[b])])))
        perm.append(sd.SSC_PAIRS.index(pair))
    mind = sd.mind_ssc(volume)
    swapped = sd.mind_ssc(np.ascontiguousarray(volume.transpose(0, 2, 1)))
    np.testing.assert_allclose(swapped[perm].transpose(0, 1, 3, 2), mind, atol=1e-5)
    assert sorted(perm) == list(range(12)) and perm != list(range(12))


def test_mind_ssc_sees_edge_direction_not_contrast():
    vertical = np.zeros((7, 16, 16), np.float32)
    vertical[:, :, 8:] = 1.0
    horizontal = np.ascontiguousarray(vertical.transpose(0, 2, 1))
    at = (slice(None), 3, 8, 8)
    weak, strong = sd.mind_ssc(vertical)[at], sd.mind_ssc(500.0 * vertical)[at]
    np.testing.assert_allclose(weak, strong, atol=1e-5)
    assert np.abs(sd.mind_ssc(horizontal)[at] - weak).max() > 0.5


# --- nearest-neighbour matching ----------------------------------------------------------------------------------


def test_match_scores_and_nearest_neighbours_by_hand():
    lp, rp, ptv = bit("LeftParotid"), bit("RightParotid"), bit("PTV70")
    scores = sd.match_scores(np.array([lp, rp, lp | ptv, ptv]), np.array([lp, lp, ptv, 0]))
    assert scores == {"RightParotid": (0, 1), "LeftParotid": (1, 2), "PTV70": (1, 2)}
    q = torch.tensor([[0.0, 10.0], [1.0, 0.0]])  # queries (C=2, Q=2): (0, 1) and (10, 0)
    c = torch.tensor([[0.0, 9.0, 0.0], [5.0, 0.0, 0.5]])  # candidates (0, 5), (9, 0), (0, 0.5)
    assert sd.nearest_neighbours(q, c, sd.SSD).tolist() == [2, 1]
    assert sd.nearest_neighbours(q, c, sd.COSINE).tolist()[1] == 1  # direction only
    assert sd.nearest_neighbours(q, c, sd.COSINE).tolist()[0] in (0, 2)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_dinov3(TINY)


def test_identical_patients_match_perfectly(tiny_model):
    a, b = synthetic_case("pt_1"), synthetic_case("pt_2")  # same anatomy, same texture
    res = sd.evaluate(tiny_model, [a, b], shifts=(1,), anchors=("Mandible", "LeftParotid"))
    assert res["settings"]["slice_pairs"] == 4  # two ordered pairs x two anchors
    for grid in ("pixels", "patches"):
        desc = res["grids"][grid]
        for name in ("intensity", "MIND-SSC", "learned", "position"):
            assert desc[name]["micro"] == 1.0, (grid, name)
        assert desc["chance"]["micro"] < 0.5
    per = res["grids"]["pixels"]["learned"]["per_structure"]
    assert per["Mandible"]["n"] > 0 and per["RightParotid"]["n"] > 0 and per["PTV70"]["n"] == 0
    table = sd.markdown_table(res, "pixels")
    assert "| Mandible |" in table and "**100.0**" in table and "PTV70" not in table


def test_shifted_patient_separates_position_from_appearance(tiny_model):
    """B is A moved 20 px sideways: matching by image position fails, matching by appearance still finds it."""
    a, b = synthetic_case("pt_1"), synthetic_case("pt_2", shift=20)
    res = sd.evaluate(tiny_model, [a, b], shifts=(1,), anchors=("Mandible",), grids=("pixels",))
    desc = res["grids"]["pixels"]
    assert desc["intensity"]["per_structure"]["Mandible"]["rate"] > 0.9  # bone is bright wherever it is
    assert desc["position"]["per_structure"]["LeftParotid"]["rate"] < 0.5


# --- training ----------------------------------------------------------------------------------------------------


def test_masked_encode_is_forward_features_without_mask(tiny_model):
    x = dinov3_input(torch.rand(2, 128, 128))
    cls, patches = sd.encode(tiny_model, x)
    ref_cls, ref_patches = dinov3_features(tiny_model, x)
    torch.testing.assert_close(cls, ref_cls)
    torch.testing.assert_close(patches.transpose(1, 2).reshape(ref_patches.shape), ref_patches)
    token = torch.randn(1, 1, tiny_model.embed_dim)
    none = torch.zeros(2, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(sd.encode(tiny_model, x, none, token)[1], patches)
    some = none.clone()
    some[0, 2, 3] = True
    masked = sd.encode(tiny_model, x, some, token)[1]
    assert not torch.allclose(masked[0], patches[0]) and torch.allclose(masked[1], patches[1])


@pytest.mark.parametrize("crop", [64, None])
def test_views_correspond_at_known_points(crop):
    """Each patch centre of one view, mapped through the returned grid, shows the same anatomy in the other view."""
    cfg = sd.SSLConfig(window_strength=0.0, rotate_deg=20, jitter_deg=10, jitter_shift=0.1, jitter_scale=0.1,
                       crop=crop)
    yy, xx = np.mgrid[0:128, 0:128]
    hu = -1024 + 1500 * np.exp(-((xx - 50) ** 2 / 800 + (yy - 70) ** 2 / 300)) + 3 * xx + 2 * yy
    size = crop or 128
    centres = torch.from_numpy(sd.patch_centres(size // 4).astype(np.float32))[None]
    for seed in range(3):
        images, body, grids, valid, windows = sd.make_views(hu.astype(np.float32), np.random.default_rng(seed), cfg, 4)
        assert images.shape == (2, size, size) and body.shape == valid.shape == (2, size // 4, size // 4)
        assert valid.any() and windows.shape == (2, 2) and (windows >= 0).all() and (windows <= (128 - size) // 4).all()
        for u in range(2):
            here = torch.nn.functional.grid_sample(torch.from_numpy(images[u])[None, None], centres,
                                                   align_corners=False)[0, 0]
            there = torch.nn.functional.grid_sample(torch.from_numpy(images[1 - u])[None, None],
                                                    torch.from_numpy(grids[u])[None], align_corners=False)[0, 0]
            v = torch.from_numpy(valid[u])
            assert (here - there)[v].abs().mean() < 0.01 < here[v].std()  # vs contrast across the view


def test_crops_get_the_rope_rows_of_their_place_in_the_frame():
    torch.manual_seed(0)
    model = build_dinov3(DINOV3_PRESETS["standin"])
    full = model.rope.get_embed(shape=(32, 32)).reshape(32, 32, -1)
    rope = sd.window_rope(model, torch.tensor([[4, 8], [0, 16]]), (16, 16), (32, 32))
    assert rope.shape == (2, 1, 256, full.shape[-1])
    assert torch.equal(rope[0, 0].reshape(16, 16, -1), full[4:20, 8:24])
    assert torch.equal(rope[1, 0].reshape(16, 16, -1), full[0:16, 16:32])
    # a "crop" that is the whole frame is the ordinary forward
    x = dinov3_input(torch.rand(2, 128, 128))
    whole = sd.encode(model, x, windows=torch.zeros(2, 2, dtype=torch.long), frame=(32, 32))[1]
    torch.testing.assert_close(whole, sd.encode(model, x)[1])


def test_sinkhorn_balances_prototypes():
    logits = torch.randn(64, 8) * 0.1 + torch.tensor([1.0] + [0.0] * 7)  # everyone prefers prototype 0
    q = sd.sinkhorn_knopp(logits, 0.05, iterations=10)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    torch.testing.assert_close(q.sum(0), torch.full((8,), 8.0), atol=0.05, rtol=0)


def _weights(path):
    return load_file(str(path))


def test_resume_reproduces_weights_bit_for_bit(tmp_path):
    cases = [synthetic_case("pt_1", seed=1), synthetic_case("pt_2", seed=2, shift=10)]
    kw = dict(batch_size=2, cases=cases, model_config=TINY, ssl=SMALL_SSL, verbose=False)
    straight = sd.train(tmp_path / "straight", 4, **kw)
    assert sd.train(tmp_path / "resumed", 4, stop_at=2, **kw) is None
    assert (tmp_path / "resumed" / sd.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "resumed" / sd.WEIGHTS_FILE).exists()
    resumed = sd.train(tmp_path / "resumed", 4, **kw)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = json.loads((tmp_path / "straight" / sd.LOG_FILE).read_text())["log"]
    log_b = json.loads((tmp_path / "resumed" / sd.LOG_FILE).read_text())["log"]
    assert [e["loss"] for e in log_a] == [e["loss"] for e in log_b] and len(log_a) == 4
    # training moved the weights away from the initialisation
    torch.manual_seed(0)
    init = build_dinov3(TINY).state_dict()
    assert not torch.equal(init["patch_embed.proj.weight"], a["patch_embed.proj.weight"])
    # a checkpoint of a different run is refused, not silently mixed in
    with pytest.raises(ValueError, match="different run"):
        sd.train(tmp_path / "resumed", 6, **kw)


def test_export_round_trip_loads_strictly_into_build_dinov3(tmp_path):
    config = DINOV3_PRESETS["standin"]
    torch.manual_seed(1)
    model = build_dinov3(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 1.5e6  # the shipped bundle stays a few MB
    assert model.patch_embed.img_size[0] // model.patch_embed.patch_size[0] == 32  # 32 x 32 dense grid at 128 px
    sd.export(model, tmp_path, config, {"steps_done": 0})
    loaded = sd.load_trained(tmp_path)
    strict = build_dinov3(DINOV3_PRESETS["standin"])
    strict.load_state_dict(_weights(tmp_path / sd.WEIGHTS_FILE), strict=True)
    x = dinov3_input(torch.rand(1, 128, 128))
    with torch.inference_mode():
        for m in (loaded, strict):
            torch.testing.assert_close(dinov3_features(m, x)[1], dinov3_features(model, x)[1])
    meta = json.loads((tmp_path / sd.CONFIG_FILE).read_text())
    assert meta["config"] == config.to_dict() and "not for clinical use" in meta["note"]


@pytest.mark.parametrize("objective", ["dino", "regression"])
def test_other_objectives_run_and_export(tmp_path, objective):
    """The prototype (DINO + iBOT) and cosine-regression objectives train too; its heads stay out of the exported timm state dict."""
    cfg = dataclasses.replace(SMALL_SSL, objective=objective)
    path = sd.train(tmp_path, 2, batch_size=2, cases=[synthetic_case("pt_1", seed=1)], model_config=TINY, ssl=cfg,
                    verbose=False)
    log = json.loads((tmp_path / sd.LOG_FILE).read_text())["log"]
    assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)
    assert log[0]["cls"] > 0 and log[0]["patch_visible"] > 0
    weights = _weights(path)
    assert not any("head" in k and "blocks" not in k for k in weights) and "mask_token" not in weights
    build_dinov3(TINY).load_state_dict(weights, strict=True)


def test_contrastive_objective_runs_and_exports(tmp_path):
    """Dense InfoNCE between corresponding points: finite loss, the match rate logged, heads not exported."""
    cfg = dataclasses.replace(SMALL_SSL, crop=None, nce_exclusion=1.0)
    assert cfg.objective == "contrastive"  # the default, as shipped
    path = sd.train(tmp_path, 2, batch_size=2, cases=[synthetic_case("pt_1", seed=1)], model_config=TINY, ssl=cfg,
                    verbose=False)
    log = json.loads((tmp_path / sd.LOG_FILE).read_text())["log"]
    assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)
    assert 0 <= log[0]["nce_top1"] <= 1 and log[0]["negatives_per_query"] > 0
    assert log[0]["patch_visible"] > 0 or log[0]["patch_masked"] > 0
    weights = _weights(path)
    assert not any("head" in k and "blocks" not in k for k in weights) and "mask_token" not in weights
    build_dinov3(TINY).load_state_dict(weights, strict=True)
    assert "contrastive" in json.loads((tmp_path / sd.CONFIG_FILE).read_text())["training"]["method"]


def test_contrastive_loss_prefers_the_corresponding_point():
    """With identical views and a model whose tokens say where they are, the InfoNCE of the true correspondence is
    lower than with a correspondence shifted by a few patches (the loss rewards finding the same anatomy)."""
    torch.manual_seed(0)
    g, dim, b = 6, 8, 1
    cfg = dataclasses.replace(SMALL_SSL, objective="contrastive", proj_dim=dim, nce_exclusion=0.5, nce_temp=0.1)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    student = type("S", (), {"cls_head": Identity(), "patch_head": Identity()})()
    teacher = type("T", (), {"patch_head": Identity()})()
    tokens = torch.randn(1, g * g, dim).repeat(2 * b, 1, 1)  # both views see the same distinct tokens
    centres = torch.from_numpy(sd.patch_centres(g)).float()[None].repeat(2 * b, 1, 1, 1)
    batch = {"body": torch.ones(2 * b, g, g, dtype=torch.bool), "masks": torch.zeros(2 * b, g, g, dtype=torch.bool),
             "valid": torch.ones(2 * b, g, g, dtype=torch.bool), "grids": centres}
    cls = torch.randn(2 * b, dim)
    centers = {"cls": torch.zeros(1, dim), "patch": torch.zeros(1, dim)}
    right, diag = sd._contrastive_terms(student, teacher, cls, tokens, cls, tokens, batch, dict(centers), cfg)
    shifted = dict(batch, grids=torch.roll(centres, 2, dims=2))
    wrong, _ = sd._contrastive_terms(student, teacher, cls, tokens, cls, tokens, shifted, dict(centers), cfg)
    assert diag["nce_top1"] > 0.9
    assert right["patch_visible"] < wrong["patch_visible"]
