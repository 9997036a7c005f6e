"""training/train_standins.py: the command lines it runs (the whole pipeline takes an hour; its pieces are tested
in the other files here)."""

from pathlib import Path

from training import train_standins as T


def test_medsam_trains_in_two_stages_and_the_others_in_one(tmp_path):
    out = tmp_path / "runs"
    medsam = T._train_commands("medsam", out / "medsam", 2500, seed=3, threads=1, limit=None)
    assert len(medsam) == 2
    base, tune = medsam
    assert base[base.index("--out") + 1] == str(out / "medsam_base") and "--no-eval" in base
    assert base[base.index("--steps") + 1] == "2500" and base[base.index("--seed") + 1] == "3"
    assert tune[tune.index("--out") + 1] == str(out / "medsam")  # the stage that is exported
    assert tune[tune.index("--init-from") + 1] == str(out / "medsam_base")
    assert tune[tune.index("--steps") + 1] == str(T.MEDSAM_FINETUNE["steps"])
    assert tune[tune.index("--end-share") + 1] == str(T.MEDSAM_FINETUNE["end_share"])
    (dino,) = T._train_commands("dinov3", out / "dinov3", 2000, seed=0, threads=2, limit=5)
    assert "--eval" in dino and dino[dino.index("--limit") + 1] == "5" and dino[dino.index("--threads") + 1] == "2"
    (clip,) = T._train_commands("biomedclip", out / "biomedclip", 1500, seed=0, threads=1, limit=None)
    assert "--limit" not in clip and clip[:3] == [T.PY, "-m", "training.standins.biomedclip"]


def test_every_teacher_has_default_steps():
    assert set(T.DEFAULT_STEPS) == set(T.TEACHERS)
    assert all(isinstance(v, int) and v > 0 for v in T.DEFAULT_STEPS.values())
    assert Path(T.MANIFEST).name == "manifest.json"


def test_the_export_writes_a_bundle_by_role_that_loads(tmp_path, monkeypatch):
    """The shipped stand-ins exported again (their trained modules stand in for the runs'): a format-2 bundle whose
    every tensor is the shipped one."""
    import torch

    from PRISMRTLib.models import load_bundle
    from PRISMRTLib.weights import default_manifest, model_path
    from training.standins import biomedclip, dinov3, medsam

    shipped = load_bundle(model_path(T.BUNDLE_NAME, default_manifest()))
    monkeypatch.setattr(medsam, "load_trained", lambda folder: shipped.modules["sam"])
    monkeypatch.setattr(dinov3, "load_trained", lambda folder: shipped.modules["dino"])
    monkeypatch.setattr(biomedclip, "load_trained", lambda folder: shipped.modules["clip"])
    folder = T.export_bundle(tmp_path / "runs", folder=tmp_path / "bundle", manifest=None)
    again = load_bundle(folder)
    assert again.roles == ("sam", "dino", "clip") and [s.name for s in again.teachers.values()] == [
        "medsam-standin", "dinov3-standin", "biomedclip-standin"]
    for role in again.roles:
        a, b = again.modules[role].state_dict(), shipped.modules[role].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
