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
