"""training/distill/cost.py: the FLOP counter on hand-checkable cases, and the cost table on tiny architectures
(the "tiny" student against the "tiny" and "tiny-lite" teacher sets): every row, positive FLOPs, the student's
backbone/translator split, ratios from the rows, the Markdown table and the CLI's JSON."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.distill import cost


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_linear_flops_are_two_macs():
    layer = nn.Linear(24, 10)
    total, by_module = cost.count_flops(layer, torch.randn(3, 24))
    assert total == 2 * 24 * 10 * 3
    assert by_module["Linear"] == total


def test_conv_and_cpu_attention_are_counted():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    total, _ = cost.count_flops(conv, torch.randn(1, 4, 5, 5))
    assert total == 2 * (4 * 9) * 6 * 25
    q = torch.randn(2, 3, 16, 8)  # (B, heads, L, d): QK^T and AV, 2 x B*h*L*L*d each
    total, _ = cost.count_flops(lambda t: F.scaled_dot_product_attention(t, t, t), q)
    assert total == 2 * (2 * 2 * 3 * 16 * 16 * 8)


def test_parse_students():
    assert cost.parse_students("vit_small@256, vit_base@512") == [("vit_small", 256), ("vit_base", 512)]
    with pytest.raises(ValueError):
        cost.parse_students("vit_small")
    with pytest.raises(ValueError):
        cost.parse_students("vit_small@250")


@pytest.fixture(scope="module")
def tiny_table():
    torch.set_num_threads(1)
    return cost.run_table([("tiny", 128), ("tiny", 64)], teacher_set="tiny-lite", official_set="tiny",
                          repeats=1, warmup=0)


def test_table_has_every_row(tiny_table):
    rows = tiny_table["rows"]
    assert [(r["group"], r["model"], r["input_px"]) for r in rows] == [
        ("student", "student tiny", 128), ("student", "student tiny", 64),
        ("official", "medsam-tiny", 128), ("official", "dinov3-tiny", 128), ("official", "biomedclip-tiny", 64),
        ("actual", "litemedsam-tiny", 256), ("actual", "dinov3-tiny", 128), ("actual", "biomedclip-tiny", 64),
    ]
    for r in rows:
        assert r["flops"] > 0 and r["params"] > 0 and r["ms"] > 0
    # a teacher in both sets is measured once
    dino = [r for r in rows if r["model"] == "dinov3-tiny"]
    assert dino[0]["flops"] == dino[1]["flops"] and dino[0]["ms"] == dino[1]["ms"]
    # the larger input costs more; the student's translators are split out and add up to the total
    s128, s64 = rows[0], rows[1]
    assert s128["flops"] > s64["flops"]
    for s in (s128, s64):
        split = s["flops_split"]
        assert set(split) == {"backbone"} | {f"translator {n}" for n in
                                            ("sam_embedding", "dino_cls", "dino_patches", "clip_cls", "clip_patches")}
        assert sum(split.values()) == s["flops"] and split["backbone"] > 0 and split["translator sam_embedding"] > 0


def test_ratios_are_computed_from_the_rows(tiny_table):
    rows = tiny_table["rows"]
    for q, s in zip(tiny_table["ratios"], rows[:2]):
        for group in ("official", "actual"):
            members = [r for r in rows if r["group"] == group]
            flops, ms = sum(r["flops"] for r in members), sum(r["ms"] for r in members)
            assert q[f"{group}_total_flops"] == flops
            assert q[f"{group}_flops_ratio"] == pytest.approx(flops / s["flops"])
            assert q[f"{group}_time_ratio"] == pytest.approx(ms / s["ms"])


def test_markdown_lists_every_row(tiny_table):
    text = cost.markdown(tiny_table)
    for r in tiny_table["rows"]:
        assert f"| {r['model']} | {r['role']} | {r['input_px']} |" in text
    assert "2 x MACs" in text and "not counted" in text
    assert "tiny teachers / student, FLOPs" in text and "backbone GFLOPs" in text


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert cost.main(["--students", "tiny@64", "--teacher-set", "tiny", "--official-set", "tiny", "--quick",
                      "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["group"] for r in data["rows"]] == ["student"] + ["official"] * 3 + ["actual"] * 3
    assert data["settings"]["threads"] == 1 and data["settings"]["repeats"] == 1
    assert "| student tiny |" in capsys.readouterr().out
