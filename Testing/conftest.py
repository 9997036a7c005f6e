"""Shared fixtures: paths to the shipped sample and to ../shared/data, and synthetic volumes with known geometry."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, REPO, SAMPLE_DIR, SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set PRISMRT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_ct() -> sitk.Image:
    return sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))


@pytest.fixture(params=sorted(DIRECTIONS))
def direction_case(request):
    return request.param, DIRECTIONS[request.param]
