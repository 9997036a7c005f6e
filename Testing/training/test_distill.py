"""The distillation (training/distill/): PHI-S, the target cache, the loop's determinism (resume, DDP), export.

Everything runs on the registry's tiny teacher architectures ("tiny-lite": LiteMedSAM's, DINOv3's and BiomedCLIP's
at test size) with random weights, saved as a real teachers bundle; the cache is built through the same encoders
the real build uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from PRISMRTLib.imaging import Letterbox
from PRISMRTLib.models.bundle import build_components, load_bundle, preset_configs, save_bundle
from training.distill.config import RunConfig
from training.distill.phis import PhiS, balanced_rotation, fold_into, hadamard
from training.distill.targets import (TargetCache, TeacherEncoders, dequantise_int8, quantise_int8, write_shard)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- PHI-S -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 12, 20, 48, 128, 256, 384, 768])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_allclose(h @ h.T, n * np.eye(n))


def test_widths_without_a_hadamard_get_an_orthogonal_matrix():
    assert hadamard(7) is None
    q, kind = balanced_rotation(7)
    assert kind == "random-orthogonal"
    np.testing.assert_allclose(q @ q.T, np.eye(7), atol=1e-12)


def test_phis_is_isotropic_and_invertible_where_per_channel_scaling_is_not():
    # LiteMedSAM-like: channel stds spanning 500x, correlated channels, a fixed offset
    g = torch.Generator().manual_seed(0)
    c = 32
    mix = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    std = torch.logspace(np.log10(3e-4), np.log10(0.155), c, dtype=torch.float64)
    x = (torch.randn(20000, c, generator=g, dtype=torch.float64) * std) @ mix.T + 0.3
    phis = PhiS(c).fit(x)
    z = phis(x, dim=-1)
    var = z.var(0)
    np.testing.assert_allclose(var.numpy(), 1.0, rtol=0.03)  # every channel carries the same variance
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=0.02)
    torch.testing.assert_close(phis.inverse(z, dim=-1), x, rtol=0, atol=1e-10)
    # a distance in z is a distance in x over one number (the transform is a scaled rotation)
    d_x = (x[:100] - x[100:200]).norm(dim=1)
    d_z = (z[:100] - z[100:200]).norm(dim=1)
    torch.testing.assert_close(d_z * phis.scale, d_x, rtol=1e-9, atol=1e-12)


def test_phis_on_feature_maps_uses_the_channel_axis():
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)[:, None, None]
    phis = PhiS(16).fit(x.permute(0, 2, 3, 1).reshape(-1, 16))
    z = phis(x, dim=1)
    flat = phis(x.permute(0, 2, 3, 1).reshape(-1, 16), dim=-1).reshape(3, 5, 5, 16).permute(0, 3, 1, 2)
    torch.testing.assert_close(z, flat)
    torch.testing.assert_close(phis.inverse(z, dim=1), x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_folding_the_inverse_into_the_last_layer(kind):
    torch.manual_seed(0)
    c = 12
    phis = PhiS(c).fit(torch.randn(500, c, dtype=torch.float64) * torch.arange(1, c + 1) + 5)
    layer = nn.Linear(8, c) if kind == "linear" else nn.Conv2d(8, c, 1)
    h = torch.randn(4, 8) if kind == "linear" else torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        want = phis.inverse(layer(h).double(), dim=-1 if kind == "linear" else 1).float()
        fold_into(layer, phis)
        got = layer(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fold_refuses_a_3x3_convolution():
    with pytest.raises(ValueError, match="1x1"):
        fold_into(nn.Conv2d(4, 4, 3), PhiS(4))


# ---- config and cache --------------------------------------------------------------------------------------------
def test_config_refuses_unknown_keys_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['stpes'\\] in 'train'"):
        RunConfig.from_dict({"train": {"stpes": 3}})
    with pytest.raises(ValueError, match="unknown config keys"):
        RunConfig.from_dict({"trian": {}})
    config = RunConfig.from_dict({"train": {"steps": 7}, "loss": {"prompt": 0.5}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert RunConfig.load(path).to_dict() == config.to_dict()
    for name in ("cpu_vits256.json",):
        RunConfig.load(REPO / "training" / "distill" / "configs" / name)  # the shipped configs parse


def test_int8_targets_keep_small_channels():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 16, 16)) * np.logspace(-3.5, -0.8, 8)[:, None, None]).astype(np.float32)
    q, scale = quantise_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16
    back = dequantise_int8(q, scale)
    rel = np.abs(back - x).reshape(8, -1).max(1) / np.abs(x).reshape(8, -1).max(1)
    assert rel.max() < 0.01  # per-channel scales: the near-dead channels keep their shape too


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny-lite teachers bundle (random weights), a 32-item cache encoded by it, and a config pointing at both."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    configs = preset_configs("tiny-lite")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    teachers = save_bundle(root / "teachers", "teachers", configs, build_components("teachers", configs), vocab,
                           name="tiny-teachers", version="1")
    config = RunConfig.from_dict({
        "name": "test",
        "teachers": {"set": "tiny-lite", "models": {r: str(teachers) for r in ("sam", "dino", "clip")},
                     "sam_heads": str(teachers)},
        "cache": {"items": 32, "image_size": 256},
        "student": {"preset": "tiny", "overrides": {"upsample": "learned"}},
        "loss": {"normaliser_samples": 8, "prompt_share": 0.5},
        "train": {"steps": 4, "batch_size": 4, "warmup": 1, "lr": 1e-4, "threads": 1, "eval_items": 8,
                  "eval_every": 2, "log_every": 1, "checkpoint_every": 2},
    })
    encoders = TeacherEncoders(config)
    rng = np.random.default_rng(0)
    cache = root / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"settings": {"image_size": 256}}))
    shards: dict = {}
    for shard in range(2):
        arrays, specs = {}, []
        for k in range(16):
            base = rng.random((32, 32)).astype(np.float32)
            views = {}
            for size in {256, *encoders.sizes}:
                image = torch.nn.functional.interpolate(torch.from_numpy(base)[None, None], (size, size),
                                                        mode="bilinear", align_corners=False)[0, 0].numpy()
                views[size] = (image, Letterbox.fit((size, size), (1.0, 1.0), size))
            features = encoders.encode(views)
            row = {"images": np.round(views[256][0] * 255).astype(np.uint8),
                   "body": np.packbits((views[256][0] > 0.3).reshape(-1))}
            for name, t in features.items():
                if name == "sam_embedding":
                    row[name], row[name + "_scale"] = quantise_int8(t[0].numpy())
                else:
                    row[name] = t[0].numpy().astype(np.float16)
            for key, value in row.items():
                arrays.setdefault(key, []).append(value)
            specs.append({"n": shard * 16 + k})
        write_shard(cache, shard, arrays, specs, shards)
    path = root / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return {"root": root, "config": config, "config_path": path, "cache": cache, "teachers": teachers}


def test_cache_is_verified_on_read(tiny_setup, tmp_path):
    import shutil

    cache = TargetCache(tiny_setup["cache"])
    assert len(cache) == 32
    batch = cache.batch([0, 17])
    assert batch["image"].shape == (2, 256, 256) and batch["sam_embedding"].shape == (2, 256, 64, 64)
    assert batch["body"].dtype == torch.bool
    broken = tmp_path / "broken"
    shutil.copytree(tiny_setup["cache"], broken)
    data = bytearray((broken / "shard_00001.npz").read_bytes())
    data[-100] ^= 0xFF
    (broken / "shard_00001.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        TargetCache(broken).item(20)
    with pytest.raises(FileNotFoundError, match="not a built target cache"):
        TargetCache(tmp_path)


# ---- the loop ----------------------------------------------------------------------------------------------------
def _run(setup, out, steps=None, **changes):
    from training.distill.train import Run

    d = setup["config"].to_dict()
    for section, values in changes.items():
        d[section].update(values)
    run = Run(RunConfig.from_dict(d), setup["cache"], out, log=lambda *a: None)
    run.run(steps)
    return run


def _state(run):
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def test_interrupted_run_resumes_bit_for_bit(tiny_setup, tmp_path):
    straight = _run(tiny_setup, tmp_path / "straight")
    first = _run(tiny_setup, tmp_path / "split", steps=2)
    assert first.step == 2
    resumed = _run(tiny_setup, tmp_path / "split")
    assert resumed.step == 4
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    straight_log = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]
    assert "eval" in log[1] and "cosine:sam_embedding@128" in log[1]["eval"]


def test_resume_refuses_another_config(tiny_setup, tmp_path):
    _run(tiny_setup, tmp_path / "run", steps=2)
    with pytest.raises(SystemExit, match="another config"):
        _run(tiny_setup, tmp_path / "run", train={"lr": 3e-4})


def test_training_lowers_the_loss_and_every_balancing_mode_runs(tiny_setup, tmp_path):
    run = _run(tiny_setup, tmp_path / "fixed", train={"steps": 12, "lr": 2e-3, "eval_every": 100})
    log = [json.loads(l) for l in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    for term in ("loss:sam_embedding", "loss:dino_patches", "loss:clip_patches"):  # the learnable (dense) terms
        assert np.mean([r[term] for r in log[-3:]]) < 0.95 * np.mean([r[term] for r in log[:3]]), term
    assert run.model.normalisers["sam_embedding"].scale > 0
    for mode in ("drop", "attention", "gating"):
        out = tmp_path / mode
        _run(tiny_setup, out, balance={"mode": mode}, train={"steps": 2},
             loss={"return_decoder": 0.1} if mode == "gating" else {})
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        weights = [v for k, v in record.items() if k.startswith("weight:")]
        assert len(weights) == 3 and abs(sum(weights) - 3) < 1e-5, (mode, record)
        if mode == "gating":
            assert "loss:return:sam_embedding" in record


def test_two_process_ddp_matches_one_process_with_the_whole_batch(tiny_setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["--config", str(tiny_setup["config_path"]), "--cache", str(tiny_setup["cache"])]
    one = subprocess.run([sys.executable, "-m", "training.distill.train", *common, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training.distill.train", *common, "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in logs[1]], [r["loss"] for r in logs[0]], rtol=1e-4)
    states = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in ("one", "two")]
    for key, value in states[0].items():
        if value.is_floating_point():
            # Adam can amplify float rounding on near-zero gradients up to lr per step: 4 steps of lr 1e-4
            torch.testing.assert_close(states[1][key], value, rtol=0, atol=5e-4, msg=key)


def test_export_folds_the_normalisers_and_the_student_backend_runs_it(tiny_setup, tmp_path):
    from PRISMRTLib.features.backends import StudentBackend
    from training.distill.export import export

    run = _run(tiny_setup, tmp_path / "run")
    images = TargetCache(tiny_setup["cache"]).batch([30, 31])["image"]
    images = torch.nn.functional.interpolate(images[:, None], (128, 128), mode="bilinear", antialias=True)[:, 0]
    folder = export(tmp_path / "run", tmp_path / "bundle", check_images=images)
    bundle = load_bundle(folder)
    assert bundle.kind == "prismrt" and set(bundle.roles) == {"sam", "dino", "clip"}
    with torch.no_grad():
        pred, _ = run.model.predict(images)
        got = bundle.modules["student"](images)
    for name, z in pred.items():  # float16 storage: agree to its precision
        want = run.model.denormalise(name, z)
        assert float((got[name] - want).abs().max()) <= 2e-3 * float(want.abs().max()) + 1e-4, name
    backend = StudentBackend(bundle)
    features = backend.encode(np.random.default_rng(0).random((2, 40, 50)).astype(np.float32))
    assert features.sam_embedding.shape == (2, 256, 64, 64)
    assert features.dino_patches.shape[1:] == (48, 8, 8) and features.clip_embedding.shape == (2, 32)


# ---- judging the student (evaluate.py) ---------------------------------------------------------------------------
def test_fidelity_nmse_is_the_phis_space_mse_and_scores_the_mean_as_one():
    from training.distill.evaluate import fidelity_of
    from training.distill.model import dense_fidelity

    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 16, 8, 8, generator=g) * torch.logspace(-2, 0, 16)[None, :, None, None] + 3.0
    pred = target + 0.3 * torch.randn(target.shape, generator=g)
    assert fidelity_of(target, target)["nmse"] == pytest.approx(0.0, abs=1e-9)
    assert fidelity_of(target, target)["cosine"] == pytest.approx(1.0, abs=1e-5)
    mean = target.mean((0, 2, 3), keepdim=True).expand_as(target)
    assert fidelity_of(mean, target)["nmse"] == pytest.approx(1.0, rel=1e-5)
    reference = PhiS(16).fit(target.permute(0, 2, 3, 1).reshape(-1, 16))
    # the same number, up to the fit's unbiased variance (384 pixels: 0.3 %)
    assert fidelity_of(pred, target)["nmse"] == pytest.approx(dense_fidelity(pred, target, reference)["nmse"],
                                                                 rel=1e-2)


def test_probe_labels_keep_their_place_and_the_probe_separates_what_is_separable():
    from training.distill.evaluate import PROBE_CLASSES, _labels_on_grid, fit_probe, probe_scores

    # a 100 x 200 slice (rows x cols, 2 mm x 1 mm pixels: square in mm), organ 2 in the top-left, organ 3 lower right
    label = np.ones((100, 200), np.uint8)
    label[10:30, 20:60] = 2
    label[60:90, 140:190] = 3
    box = Letterbox.fit((100, 200), (2.0, 1.0), 64)
    grid = _labels_on_grid(label, box, (0.0, 0.0, 100.0, 200.0), 16)
    rows, cols = np.nonzero(grid == 2)
    assert rows.max() < 6 and cols.max() < 6  # top-left, not transposed or flipped
    rows, cols = np.nonzero(grid == 3)
    assert rows.min() >= 9 and cols.min() >= 10
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, len(PROBE_CLASSES), (3000,), generator=g)
    x = torch.nn.functional.one_hot(y, len(PROBE_CLASSES)).float() * 3 + torch.randn(3000, 9, generator=g) * 0.3
    mean, std, linear = fit_probe(x[:2000], y[:2000], len(PROBE_CLASSES), steps=50)
    with torch.no_grad():
        pred = linear((x[2000:] - mean) / std).argmax(1)
    assert probe_scores(pred, y[2000:], len(PROBE_CLASSES))["organ mean"] > 0.99
    from training.distill.evaluate import _auc

    assert _auc(torch.tensor([0.1, 0.4, 0.5, 0.8]), torch.tensor([False, True, False, True])) == 0.75
    assert _auc(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([True, False, True])) == 0.75  # a tie counts half
    noise = torch.randn(3000, 9, generator=g)
    mean, std, linear = fit_probe(noise[:2000], y[:2000], len(PROBE_CLASSES), steps=50)
    with torch.no_grad():
        pred = linear((noise[2000:] - mean) / std).argmax(1)
    assert probe_scores(pred, y[2000:], len(PROBE_CLASSES))["organ mean"] < 0.3


def _held_out_data(root: Path) -> Path:
    """Two synthetic head-and-neck 'validation' CTs (a body ellipse, brainstem and cord blocks) in OpenKBP's layout."""
    import SimpleITK as sitk

    for n, patient in enumerate(("pt_201", "pt_202")):
        folder = root / "openkbp" / "validation-pats" / patient
        folder.mkdir(parents=True)
        z, y, x = np.mgrid[:12, :48, :48]
        hu = np.where(((y - 24) / 20.0) ** 2 + ((x - 24) / 16.0) ** 2 < 1, 40, -1000).astype(np.int16)
        masks = {"Brainstem": (abs(y - 20) < 4) & (abs(x - 24) < 4) & (z > 5),
                 "SpinalCord": (abs(y - 32 - n) < 3) & (abs(x - 24) < 3) & (z < 8)}
        for name, array in {"ct": hu, **masks}.items():
            image = sitk.GetImageFromArray(array.astype(np.int16 if name == "ct" else np.uint8))
            image.SetSpacing((3.9, 3.9, 2.5))
            sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return root


def test_evaluate_fidelity_and_probe_run_on_held_out_images(tiny_setup, tmp_path):
    from training.distill.evaluate import fidelity, fidelity_markdown, probe, probe_markdown

    _run(tiny_setup, tmp_path / "run")
    data = _held_out_data(tmp_path / "data")
    result = fidelity(tmp_path / "run", sizes=(128, 256), views=3, data=data, log=lambda *a: None)
    names = {r["feature"] for r in result["rows"]}
    assert {"sam_embedding", "dino_patches", "clip_patches", "dino_cls", "clip_cls"} <= names
    assert {r["input_size"] for r in result["rows"]} == {128, 256}
    assert result["sources"] == {"openkbp": ["pt_201", "pt_202"]}
    assert all(-1 <= r["cosine"] <= 1 and r["nmse"] >= 0 for r in result["rows"])
    assert "| sam_embedding |" in fidelity_markdown(result)
    result = probe(tmp_path / "run", patients=2, slices=2, data=data, log=lambda *a: None)
    assert result["train_patients"] == ["pt_201"] and result["test_patients"] == ["pt_202"]
    kinds = [r["features"] for r in result["rows"]]
    assert kinds[:2] == ["student tokens (trained)", "student tokens (random init, control)"]
    assert "teacher sam_embedding" in kinds and "student -> sam_embedding" in kinds
    assert all(0 <= r["body"] <= 1 for r in result["rows"])
    assert "| student tokens (trained) |" in probe_markdown(result)


def test_evaluate_delineation_puts_teacher_and_student_through_the_same_prompts(tiny_setup, tmp_path):
    import SimpleITK as sitk

    from training.distill.evaluate import delineation, delineation_markdown
    from training.distill.export import export

    _run(tiny_setup, tmp_path / "run")
    bundle = export(tmp_path / "run", tmp_path / "bundle")
    z, y, x = np.mgrid[:8, :40, :40]
    ct = np.where(((y - 20) ** 2 + (x - 20) ** 2) < 300, 40, -1000).astype(np.int16)
    ct[((z - 4) ** 2 * 4 + (y - 18) ** 2 + (x - 22) ** 2) < 40] = 200
    for name, array in {"ct": ct, "lesion": (ct == 200).astype(np.uint8)}.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.5))
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"name": "tiny", "cases": [
        {"id": "synthetic", "image": "ct.nii.gz", "structures": {"lesion": "lesion.nii.gz"}, "group": "lesion"}]}))
    result = delineation(str(bundle), tmp_path / "out", [cases], teacher=str(tiny_setup["teachers"]), clicks=2)
    assert result["teacher"] != result["student"]
    assert [(r["mode"], r["prompts"]) for r in result["rows"]] == [("2d", "1 click"), ("2d", "2 clicks")]
    assert all(0 <= r["teacher_dice"] <= 1 and 0 <= r["student_dice"] <= 1 for r in result["rows"])
    assert "eval-seg" in result["eval_seg_command"] and "| lesion | 2d | 1 click |" in delineation_markdown(result)


def test_a_run_warm_starts_from_another_runs_checkpoint_with_the_same_normalisers(tiny_setup, tmp_path):
    first = _run(tiny_setup, tmp_path / "first")
    second = _run(tiny_setup, tmp_path / "second", steps=0, student={"init": f"run:{tmp_path / 'first'}"})
    for key, value in first.model.state_dict().items():  # the student and its normalisers
        if key.startswith(("student.", "normalisers.")):
            assert torch.equal(value, second.model.state_dict()[key]), key
    with pytest.raises(ValueError, match="warm-start only from a run with the same"):
        _run(tiny_setup, tmp_path / "third", steps=0, student={"init": f"run:{tmp_path / 'first'}"},
             loss={"normaliser": "identity"})


# ---- the LiteMedSAM-trunk student (SAM-CLIP-style: the SAM teacher's encoder, the others distilled onto it) --------
LITE_TRUNK = {"preset": "litemedsam_256", "init": "teacher", "freeze_trunk": True,
              "overrides": {"translator_hidden": 16, "translator_depth": 1}}


def test_the_litemedsam_trunk_gives_the_teachers_own_embedding_even_letterboxed(tiny_setup):
    from PRISMRTLib.features.backends import StudentBackend, TeacherBackend, teachers_of
    from training.distill.train import build_student, load_heads

    config = RunConfig.from_dict({**tiny_setup["config"].to_dict(), "student": LITE_TRUNK})
    specs, *_ = load_heads(config)
    student = build_student(config, specs).eval()
    teachers = load_bundle(tiny_setup["teachers"])
    sam = teachers.modules["sam"]
    box = Letterbox.fit((30, 50), (1.0, 1.0), 256)  # a wide slice: padding below, normalised over its content
    images = 0.3 + 0.5 * torch.rand(2, 256, 256)  # a content minimum above 0: min-max over the padding differs
    r0, c0, r1, c1 = box.content_box
    images[:, r1:] = 0
    with torch.no_grad():
        got = student(images, box.content_box)["sam_embedding"]
        want = specs["sam"].encode(sam, images, box.content_box)["sam_embedding"]
        whole = student(images)["sam_embedding"]  # without the box: normalised over the padding too
    assert torch.equal(got, want)
    assert float((whole - want).abs().max()) > 1e-3
    slices = np.random.default_rng(1).random((2, 30, 50)).astype(np.float32)
    from PRISMRTLib.models.bundle import Bundle

    bundle = Bundle(kind="prismrt", name="s", version="0", configs={}, modules={"student": student}, tokenizer=None,
                    teachers={"sam": specs["sam"]}, path=None, meta={})
    a = StudentBackend(bundle).encode(slices, (1.0, 1.0)).sam_embedding
    b = TeacherBackend(teachers_of(teachers)).encode(slices, (1.0, 1.0), sam_only=True).sam_embedding
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_frozen_litemedsam_trunk_trains_only_the_translators_from_the_cache(tiny_setup, tmp_path, monkeypatch):
    from PRISMRTLib.models.litemedsam import litemedsam_input
    from PRISMRTLib.models.registry import tensor_digest
    from training.distill.export import export
    from training.distill.train import trunk_teacher_state

    calls = []
    import PRISMRTLib.models.student as student_module

    real = student_module.Student.tokens
    monkeypatch.setattr(student_module.Student, "tokens", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    run = _run(tiny_setup, tmp_path / "run", student=LITE_TRUNK, train={"steps": 6, "lr": 2e-3})
    assert not calls  # the trunk never ran: its output is the cache's SAM embedding
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = {k for r in log for k in r if k.startswith("loss:")}
    assert terms == {"loss:dino_patches", "loss:dino_cls", "loss:clip_patches", "loss:clip_cls"}  # no SAM, no prompt
    teacher = trunk_teacher_state(run.config, run.student)
    assert tensor_digest(run.student.backbone.state_dict()) == tensor_digest(teacher)
    assert "cosine:dino_patches@256" in log[1]["eval"] and "cosine:sam_embedding@256" not in log[1]["eval"]
    monkeypatch.undo()

    images = TargetCache(tiny_setup["cache"]).batch([30, 31])["image"]
    folder = export(tmp_path / "run", tmp_path / "bundle", check_images=images)
    stored = json.loads((folder / "config.json").read_text())
    assert stored["base"]["components"] == {"student.backbone": "sam.image_encoder"}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("student.backbone.")]  # the trunk is the teacher's, not stored
    bundle = load_bundle(folder)
    with torch.no_grad():
        got = bundle.modules["student"](images)
        want = load_bundle(tiny_setup["teachers"]).modules["sam"].image_encoder(
            litemedsam_input(images, (0, 0, 256, 256)))
    assert torch.equal(got["sam_embedding"], want)

    # a base with other weights is refused, naming what to do
    other = tmp_path / "other_teachers"
    configs = preset_configs("tiny-lite")
    torch.manual_seed(5)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    save_bundle(other, "teachers", configs, build_components("teachers", configs), vocab, name="t", version="1")
    from PRISMRTLib.models.bundle import BundleError

    with pytest.raises(BundleError, match="trained on other weights"):
        load_bundle(folder, resolve_base=lambda name: other)


def test_a_frozen_trunk_needs_the_teachers_weights(tiny_setup, tmp_path):
    with pytest.raises(ValueError, match="set student.init to 'teacher'"):
        _run(tiny_setup, tmp_path / "run", student={**LITE_TRUNK, "init": "random"})
    with pytest.raises(ValueError, match="256 px only"):
        _run(tiny_setup, tmp_path / "run2", student=LITE_TRUNK, train={"resolutions": [[10, [128, 256]]]})
