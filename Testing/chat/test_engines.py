"""The chat's exact engines (header and structures): answers in physical space, sides in both frames, slice indices
that are voxel indices (not display rows), distances and volumes on anisotropic grids, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.chat.engines import header, structures
from PRISMRTLib.chat.structures import StructureSet
from PRISMRTLib.chat.types import ANSWERED, CANNOT_TELL, ChatContext, ChatError, Intent, SliceRef


def ask(image, kind, *ids, structure_set=None, slice=None, **kw):
    engine = header if kind in ("modality", "plane", "slice_thickness", "pixel_size", "field_of_view",
                                "scan_length", "slice_count", "dimensions") else structures
    answer = engine.answer(Intent(kind, tuple(ids), **kw), ChatContext(image, SliceRef.parse(slice), structure_set))
    assert answer is not None
    assert answer.source in ("header", "header (from the intensities)", "view", "structures")
    assert answer.kind == kind or (kind, answer.kind) == ("relative_position", "laterality")
    return answer


def sided_set(synth, direction, x_mm=40.0, **ct_kw):
    """A CT and one structure centred at x = ``x_mm`` (LPS: + = the patient's left), and its mirror image."""
    ct = synth.ct(direction, **ct_kw)
    masks = {"Lesion": synth.box(ct, (x_mm - 10, -10, -10), (x_mm + 10, 10, 10)),
             "Mirror": synth.box(ct, (-x_mm - 10, -10, -10), (-x_mm + 10, 10, 10))}
    return ct, StructureSet.from_masks(masks, ct)


# -- left and right --------------------------------------------------------------------------------------------------
DIRECTIONS = ["IDENTITY", "FLIP_X", "OPENKBP", "RAS_STORED", "CORONAL_ACQ"]


@pytest.mark.parametrize("name", DIRECTIONS)
def test_the_patients_left_is_left_whatever_the_direction_matrix(synth, name):
    ct, s = sided_set(synth, getattr(synth, name))
    a = ask(ct, "laterality", "name:Lesion", structure_set=s)
    assert a.status == ANSWERED and a.value == "left" and a.details["screen"] == "right"
    assert "patient's left" in a.answer and "screen's right" in a.answer
    b = ask(ct, "laterality", "name:Mirror", structure_set=s)
    assert b.value == "right" and b.details["screen"] == "left"
    assert a.confidence >= 0.99


def test_flipping_i_moves_the_array_but_not_the_answer(synth):
    ct1, s1 = sided_set(synth, synth.IDENTITY)
    ct2, s2 = sided_set(synth, synth.FLIP_X)
    m1, m2 = s1.resolve("name:Lesion")[0].mask, s2.resolve("name:Lesion")[0].mask
    assert not np.array_equal(m1, m2) and np.array_equal(m1, m2[:, :, ::-1])  # mirrored in the array
    assert m1.nonzero()[2].mean() > 20 > m2.nonzero()[2].mean()  # identity: left = high i; flipped: low i
    for ct, s in ((ct1, s1), (ct2, s2)):
        assert ask(ct, "laterality", "name:Lesion", structure_set=s).value == "left"


def test_polar_side_questions_in_the_patient_and_the_screen_frame(synth):
    ct, s = sided_set(synth, synth.OPENKBP)
    on = lambda side, frame="patient", slice=None: ask(  # noqa: E731
        ct, "laterality", "name:Lesion", structure_set=s, direction=side, frame=frame, polar=True, slice=slice)
    assert on("left").value is True and on("right").value is False
    assert on("right", "screen").value is True and on("left", "screen").value is False  # radiological display
    assert on("right", "screen", "coronal:18").value is True
    sagittal = on("left", "screen", "sagittal:30")
    assert sagittal.status == CANNOT_TELL and "sagittal" in sagittal.answer


def test_midline_and_bilateral(synth):
    ct = synth.ct(synth.RAS_STORED)
    masks = {"SpinalCord": synth.box(ct, (-6, 20, -30), (6, 30, 30)),
             "LeftParotid": synth.box(ct, (30, -10, 0), (50, 10, 20)),
             "RightParotid": synth.box(ct, (-50, -10, 0), (-30, 10, 20)),
             "PTV70": synth.box(ct, (-45, -20, -10), (45, 10, 10))}
    s = StructureSet.from_masks(masks, ct)
    assert ask(ct, "laterality", "spinal_cord", structure_set=s).value == "midline"
    assert ask(ct, "laterality", "parotid", structure_set=s).value == "bilateral"  # both parotids together
    wide = ask(ct, "laterality", "target", structure_set=s)
    assert wide.value == "bilateral" and wide.details["screen"] == "bilateral"
    assert ask(ct, "laterality", "parotid_left", structure_set=s, direction="left", polar=True).value is True


def test_the_midline_is_the_bodys_not_the_images(synth):
    # the patient lies 30 mm to the left of the image centre: a structure at x = 20 mm is on the patient's right
    ct = synth.ct(synth.IDENTITY, size=(60, 36, 10))
    points = synth.points(ct)
    body = ((points[..., 0] - 30) / 50) ** 2 + (points[..., 1] / 40) ** 2 <= 1
    shifted = sitk.GetImageFromArray(np.where(body, 40, -1000).astype(np.int16))
    shifted.CopyInformation(ct)
    s = StructureSet.from_masks({"Lesion": synth.box(ct, (10, -5, -5), (20, 5, 5))}, shifted)
    a = ask(shifted, "laterality", "name:Lesion", structure_set=s)
    assert a.value == "right" and a.details["offset_mm"] == pytest.approx(-15.0, abs=2.5)


# -- slice indices are voxel indices ---------------------------------------------------------------------------------
def test_an_axial_slice_index_is_k_not_the_flipped_display_index(synth):
    ct = synth.ct(synth.OPENKBP, size=(20, 20, 40))  # k runs S->I: the display stack is inverted
    mask = np.zeros((40, 20, 20), bool)
    mask[10, 8:12, 8:12] = True
    s = StructureSet.from_masks({"PTV70": mask}, ct)
    assert ask(ct, "presence", "ptv70", structure_set=s, slice="axial:10").value is True
    assert ask(ct, "presence", "ptv70", structure_set=s, slice="axial:29").value is False
    assert ask(ct, "list", structure_set=s, slice="axial:10").value == ["ptv70"]
    assert ask(ct, "list", structure_set=s, slice="axial:29").value == []
    assert ask(ct, "count", structure_set=s, slice="axial:10").value == 1
    assert ask(ct, "volume", "ptv70", structure_set=s).slice == "axial:10"


def test_a_coronal_slice_index_is_j_not_the_display_row(synth):
    ct = synth.ct(synth.RAS_STORED, size=(20, 30, 12))  # j runs A<-P: axial display rows run opposite to j
    mask = np.zeros((12, 30, 20), bool)
    mask[4:8, 5, 8:12] = True
    s = StructureSet.from_masks({"Cord": mask}, ct)
    assert ask(ct, "presence", "spinal_cord", structure_set=s, slice="coronal:5").value is True
    assert ask(ct, "presence", "spinal_cord", structure_set=s, slice="coronal:24").value is False  # row 29 - 5
    assert ask(ct, "presence", "spinal_cord", structure_set=s, slice="sagittal:9").value is True
    assert ask(ct, "presence", "spinal_cord", structure_set=s, slice="sagittal:10", scope="volume").value is True
    assert ask(ct, "presence", "spinal_cord", structure_set=s, slice="sagittal:2").value is False


def test_check_slice_says_the_valid_range_and_the_plane(synth):
    ct = synth.ct(synth.IDENTITY, size=(20, 18, 16))
    structures.check_slice(ct, SliceRef("axial", 15))
    with pytest.raises(ChatError, match=r"axial slice 16 does not exist.*0\.\.15"):
        structures.check_slice(ct, SliceRef("axial", 16))
    with pytest.raises(ChatError, match=r"coronal slice -1 does not exist.*0\.\.17"):
        structures.check_slice(ct, SliceRef("coronal", -1))
    coronal = synth.ct(synth.CORONAL_ACQ, size=(20, 18, 16))
    with pytest.raises(ChatError, match="k axis cuts coronal slices"):
        structures.check_slice(coronal, SliceRef("axial", 3))
    structures.check_slice(coronal, SliceRef("sagittal", 3))  # i still runs R-L
    s = StructureSet.from_masks({"Cord": np.zeros((16, 18, 20), bool)}, coronal)
    with pytest.raises(ChatError):
        ask(coronal, "presence", "spinal_cord", structure_set=s, slice="axial:3")


def test_slice_scope_without_a_slice_cannot_tell(synth):
    ct, s = sided_set(synth, synth.IDENTITY)
    a = ask(ct, "presence", "name:Lesion", structure_set=s, scope="slice")
    assert a.status == CANNOT_TELL and "--slice" in a.answer


# -- sizes and distances, by hand ------------------------------------------------------------------------------------
def _grid(spacing=(0.5, 2.0, 3.0), size=(30, 20, 20), direction=np.eye(3)):
    image = sitk.Image(list(size), sitk.sitkInt16) - 1000
    image.SetSpacing(spacing)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    return image


def _voxels(size, *ijk):
    mask = np.zeros(size[::-1], bool)
    for i, j, k in ijk:
        mask[k, j, i] = True
    return mask


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0])])
def test_volume_on_an_anisotropic_grid(direction):
    ct = _grid(direction=direction)
    mask = np.zeros((20, 20, 30), bool)
    mask[2:4, 3:4, 5:10] = True  # 10 voxels of 0.5 x 2 x 3 = 3 mm3
    s = StructureSet.from_masks({"GTV": mask}, ct)
    a = ask(ct, "volume", "gtv", structure_set=s)
    assert a.value == pytest.approx(0.03) and a.unit == "cm3"
    assert "ml" in ask(ct, "volume", "gtv", structure_set=s, unit="ml").answer


@pytest.mark.parametrize("b_ijk, mm", [
    ((5, 5, 8), 9.0),  # 3 slices of 3 mm apart along k
    ((9, 5, 5), 2.0),  # 4 columns of 0.5 mm along i
    ((5, 8, 5), 6.0),  # 3 rows of 2 mm along j
    ((9, 5, 8), math.sqrt(9.0 ** 2 + 2.0 ** 2)),
    ((5, 5, 6), 0.0),  # face neighbours touch
    ((6, 6, 6), 0.0),  # so do corner neighbours
])
def test_minimum_distance_on_an_anisotropic_grid(b_ijk, mm):
    size = (30, 20, 20)
    ct = _grid()
    s = StructureSet.from_masks({"Cord": _voxels(size, (5, 5, 5)), "PTV70": _voxels(size, b_ijk)}, ct)
    a = ask(ct, "distance", "spinal_cord", "ptv70", structure_set=s)
    assert a.value == pytest.approx(mm) and a.unit == "mm"
    b = ask(ct, "distance", "ptv70", "spinal_cord", structure_set=s)
    assert b.value == pytest.approx(mm)  # symmetric


def test_distance_thresholds_and_units():
    size = (30, 20, 20)
    ct = _grid()
    s = StructureSet.from_masks({"Cord": _voxels(size, (5, 5, 5)), "PTV70": _voxels(size, (5, 5, 8))}, ct)
    within = lambda t, unit="mm": ask(ct, "distance", "spinal_cord", "ptv70", structure_set=s, threshold=t,  # noqa
                                      unit=unit, polar=True).value
    assert within(10) is True and within(5) is False and within(9.0) is True
    assert within(1, "cm") is True and within(0.5, "cm") is False


def test_overlap_volume_and_shares():
    ct = _grid()
    a = np.zeros((20, 20, 30), bool)
    b = np.zeros((20, 20, 30), bool)
    a[2:6, 2:6, 2:6] = True  # 64 voxels
    b[4:8, 2:6, 2:6] = True  # 64 voxels, 32 shared
    s = StructureSet.from_masks({"PTV70": a, "Mandible": b}, ct)
    r = ask(ct, "overlap", "ptv70", "mandible", structure_set=s)
    assert r.value is True
    assert r.details["overlap_cm3"] == pytest.approx(32 * 3.0 / 1000)
    assert r.details["percent_of"] == {"PTV70": 50.0, "Mandible": 50.0}
    b[:] = False
    b[10:12, 2:6, 2:6] = True
    s = StructureSet.from_masks({"PTV70": a, "Mandible": b}, ct)
    r = ask(ct, "overlap", "ptv70", "mandible", structure_set=s)
    assert r.value is False and r.details["distance_mm"] == pytest.approx(5 * 3.0)  # k 5 to k 10


def test_closer_takes_the_reference_first_and_expands_pairs():
    size = (30, 20, 20)
    ct = _grid()
    s = StructureSet.from_masks({"PTV70": _voxels(size, (10, 10, 10)), "LeftParotid": _voxels(size, (10, 10, 14)),
                                 "RightParotid": _voxels(size, (10, 10, 18))}, ct)
    a = ask(ct, "closer", "ptv70", "parotid", structure_set=s)
    assert a.value == "parotid_left" and a.details["distances_mm"] == {"parotid_left": 12.0, "parotid_right": 24.0}
    b = ask(ct, "closer", "parotid_right", "ptv70", "parotid_left", structure_set=s)
    assert b.value == "parotid_left"  # 12 mm from RightParotid, PTV70 is 24 mm away
    one = ask(ct, "closer", "ptv70", "parotid_left", structure_set=s)
    assert one.status == CANNOT_TELL


def test_extent_in_mm_and_slices():
    ct = _grid(spacing=(1.0, 1.0, 2.5), direction=np.diag([1.0, 1.0, -1.0]))
    mask = np.zeros((20, 20, 30), bool)
    mask[4:9, 5, 5] = True
    s = StructureSet.from_masks({"SpinalCord": mask}, ct)
    a = ask(ct, "extent", "spinal_cord", structure_set=s, question="how long is the cord?")
    assert a.value == pytest.approx(12.5) and a.unit == "mm" and a.details["slices"] == 5
    b = ask(ct, "extent", "spinal_cord", structure_set=s, question="over how many slices does the cord run?")
    assert b.value == 5 and b.unit == "slices"


def test_relative_position_through_the_display_convention(synth):
    ct = synth.ct(synth.OPENKBP, size=(30, 30, 30), spacing=(3.0, 3.0, 3.0))
    s = StructureSet.from_masks({"Mandible": synth.box(ct, (-10, -30, 20), (10, -20, 30)),  # anterior, superior
                                 "Larynx": synth.box(ct, (-5, -10, -20), (5, 0, -10))}, ct)
    pos = lambda d, frame="patient", slice=None: ask(  # noqa: E731
        ct, "relative_position", "mandible", "larynx", structure_set=s, direction=d, frame=frame, polar=True,
        slice=slice).value
    assert pos("superior") is True and pos("inferior") is False
    assert pos("anterior") is True and pos("posterior") is False
    assert pos("up", "screen", "coronal:15") is True  # coronal: up is superior
    assert pos("up", "screen", "axial:15") is True  # axial: up is anterior
    assert pos("left", "screen", "sagittal:15") is True  # sagittal: the screen's left is anterior
    assert pos("right", "screen", "sagittal:15") is False
    assert pos("left") is False and pos("right") is False  # both centred: level, within the margin
    up = ask(ct, "relative_position", "mandible", "larynx", structure_set=s, direction="up", frame="screen",
             polar=True)
    assert up.status == CANNOT_TELL  # up on which screen?
    s2 = StructureSet.from_masks({"LeftParotid": synth.box(ct, (20, -10, 0), (40, 10, 10)),
                                  "SpinalCord": synth.box(ct, (-5, 10, -30), (5, 20, 30))}, ct)
    side = lambda d, frame="patient": ask(  # noqa: E731
        ct, "relative_position", "parotid_left", "spinal_cord", structure_set=s2, direction=d, frame=frame,
        polar=True).value
    assert side("left") is True and side("right", "screen") is True and side("left", "screen") is False


# -- what is not loaded, and no structure set ------------------------------------------------------------------------
def test_not_loaded_names_the_structure_and_the_loaded_ones(synth):
    ct, s = sided_set(synth, synth.IDENTITY)
    a = ask(ct, "volume", "liver", structure_set=s)
    assert a.status == CANNOT_TELL and "liver" in a.answer and "Lesion, Mirror" in a.answer
    assert a.answer.startswith("I cannot tell from this CT because")
    assert structures.answer(Intent("volume", ("liver",)), ChatContext(ct)) is None


def test_an_empty_structure_is_not_present(synth):
    ct = synth.ct()
    s = StructureSet.from_masks({"Brainstem": np.zeros(ct.GetSize()[::-1], bool)}, ct)
    assert ask(ct, "presence", "brainstem", structure_set=s).value is False
    assert ask(ct, "presence", "brainstem", structure_set=s, slice="axial:5").value is False
    assert ask(ct, "volume", "brainstem", structure_set=s).value == 0.0


# -- header ----------------------------------------------------------------------------------------------------------
def test_header_geometry_of_an_anisotropic_axial_scan(synth):
    ct = synth.ct(synth.OPENKBP, size=(40, 36, 24), spacing=(0.8, 0.9, 2.5))
    thickness = ask(ct, "slice_thickness")
    assert thickness.value == 2.5 and thickness.unit == "mm"
    assert "spacing between axial slices" in thickness.answer and "does not store" in thickness.answer
    assert ask(ct, "pixel_size").value == pytest.approx([0.9, 0.8])  # [row (j), column (i)]
    assert ask(ct, "pixel_size", slice="coronal:3").value == pytest.approx([2.5, 0.8])
    assert ask(ct, "pixel_size", slice="sagittal:3").value == pytest.approx([2.5, 0.9])
    assert ask(ct, "field_of_view").value == pytest.approx([32.0, 32.4])  # [width, height]
    assert ask(ct, "field_of_view", slice="sagittal:3").value == pytest.approx([32.4, 60.0])
    length = ask(ct, "scan_length")
    assert length.value == pytest.approx(60.0) and length.details["slice_centres_mm"] == pytest.approx(57.5)
    assert ask(ct, "slice_count").value == 24
    assert ask(ct, "slice_count", slice="coronal:3").value == 36
    assert ask(ct, "slice_count", slice="sagittal:3").value == 40
    assert ask(ct, "dimensions").value == [40, 36, 24]


def test_header_of_a_coronal_acquisition_uses_the_cranio_caudal_axis(synth):
    ct = synth.ct(synth.CORONAL_ACQ, size=(40, 30, 20), spacing=(0.8, 3.0, 1.0))  # j runs S->I
    thickness = ask(ct, "slice_thickness")
    assert thickness.value == 3.0 and "j" in thickness.answer and "not stored as axial" in thickness.answer
    assert ask(ct, "scan_length").value == pytest.approx(90.0)
    assert ask(ct, "slice_count", slice="sagittal:2").value == 40


def test_modality_from_the_tag_and_from_the_intensities(synth):
    ct = synth.ct()
    a = ask(ct, "modality")
    assert a.value == "CT" and a.source == "header (from the intensities)" and a.confidence > 0.9
    assert ask(ct, "modality", modality="MRI", polar=True).value is False
    assert ask(ct, "modality", modality="CT", polar=True).value is True
    mr = sitk.Cast(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 600, (20, 20, 20))),
                   sitk.sitkInt16)
    b = ask(mr, "modality")
    assert b.value == "MR" and b.confidence < 0.9 and "cannot prove" in b.answer
    tagged = synth.ct()
    tagged.SetMetaData("0008|0060", "MR")
    c = ask(tagged, "modality", modality="MR", polar=True)
    assert c.value is True and c.source == "header" and "0008,0060" in c.answer


def test_plane_is_the_views(synth):
    ct = synth.ct()
    assert ask(ct, "plane", slice="coronal:3").value == "coronal"
    assert ask(ct, "plane", slice="axial:3", plane="sagittal", polar=True).value is False
    assert ask(ct, "plane", slice="sagittal:3", plane="sagittal", polar=True).value is True
    none = ask(ct, "plane")
    assert none.status == CANNOT_TELL and "slice" in none.answer and none.source == "view"


# -- real data -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def openkbp(request):
    from prismrt_testing import SHARED_DATA

    folder = SHARED_DATA / "openkbp" / "validation-pats" / "pt_201"
    if not folder.is_dir():
        pytest.skip(f"shared data not found at {folder}")
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    return folder, ct, StructureSet.from_files([folder], ct)


def test_openkbp_ptv70_volume_is_its_voxels_times_the_voxel_volume(openkbp):
    folder, ct, s = openkbp
    voxels = int(np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "PTV70.nii.gz")))))
    expected = voxels * float(np.prod(ct.GetSpacing())) / 1000.0
    a = ask(ct, "volume", "ptv70", structure_set=s)
    assert voxels > 1000 and a.value == pytest.approx(expected, rel=1e-9)


def test_openkbp_parotids_are_on_their_own_sides(openkbp):
    _, ct, s = openkbp
    left = ask(ct, "laterality", "parotid_left", structure_set=s)
    right = ask(ct, "laterality", "parotid_right", structure_set=s)
    assert (left.value, left.details["screen"]) == ("left", "right")
    assert (right.value, right.details["screen"]) == ("right", "left")
    assert ask(ct, "laterality", "spinal_cord", structure_set=s).value == "midline"
    assert ask(ct, "relative_position", "parotid_left", "parotid_right", structure_set=s, direction="left",
               polar=True).value is True


def test_openkbp_presence_follows_the_mask_file(openkbp):
    folder, ct, s = openkbp
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "LeftParotid.nii.gz"))) > 0
    ks = np.nonzero(mask.any(axis=(1, 2)))[0]
    inside, outside = int(ks[len(ks) // 2]), int(ks.max() + 5)
    assert ask(ct, "presence", "parotid_left", structure_set=s, slice=f"axial:{inside}").value is True
    assert ask(ct, "presence", "parotid_left", structure_set=s, slice=f"axial:{outside}").value is False
    mirrored = ct.GetSize()[2] - 1 - inside
    assert not mask[mirrored].any()  # the flipped index would be wrong here
    assert ask(ct, "presence", "parotid_left", structure_set=s, slice=f"axial:{mirrored}").value is False


def test_totalsegmentator_sides_on_a_ras_stored_image(shared_data):
    folder = shared_data / "samples" / "ts_abdomen_ct"
    ct = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))  # direction diag(-1, -1, 1)
    s = StructureSet.from_files([folder / "example_seg.nii.gz"], ct)
    assert ask(ct, "laterality", "kidney_left", structure_set=s).value == "left"
    assert ask(ct, "laterality", "spleen", structure_set=s).value == "left"
    assert ask(ct, "laterality", "liver", structure_set=s).value == "right"
    assert ask(ct, "relative_position", "liver", "spleen", structure_set=s, direction="left", frame="screen",
               polar=True, slice="axial:15").value is True


def test_a_stored_slice_thickness_and_an_oblique_stack_are_said(synth):
    ct = synth.ct(synth.OPENKBP, spacing=(1.0, 1.0, 2.0))
    ct.SetMetaData("0018|0050", "3.0")  # thicker than the spacing: the slices overlap
    a = ask(ct, "slice_thickness")
    assert a.value == 3.0 and "overlap" in a.answer and a.details["spacing_mm"] == 2.0
    from prismrt_testing import rotation

    oblique = synth.ct(rotation(2, 12.0) @ synth.OPENKBP)
    b = ask(oblique, "slice_thickness")
    assert b.value == 2.5 and "oblique by 12.0 degrees" in b.answer
