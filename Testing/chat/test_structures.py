"""The chat's structure set: files in, named masks on the CT's grid out; off-grid masks refused with the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.chat.structures import StructureSet, body_from_image
from PRISMRTLib.chat.types import ChatError


def _write(array, reference, path, dtype=np.uint8):
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def ct(synth):
    return synth.ct(synth.OPENKBP)


def test_mask_files_are_named_after_the_file_and_mapped_to_concepts(ct, synth, tmp_path):
    left = synth.box(ct, (20, -10, -10), (40, 10, 10))
    _write(left, ct, tmp_path / "LeftParotid.nii.gz")
    _write(left * 255, ct, tmp_path / "PTV_70.nrrd")  # 0/255 is a binary mask too
    s = StructureSet.from_files([tmp_path / "LeftParotid.nii.gz", tmp_path / "PTV_70.nrrd"], ct)
    assert s.names == ["LeftParotid", "PTV_70"]
    assert [x.concept for x in s] == ["parotid_left", "ptv70"]
    assert all(x.mask.dtype == bool and x.mask.shape == ct.GetSize()[::-1] for x in s)
    np.testing.assert_array_equal(s.structures[0].mask, left)
    assert s.structures[1].voxel_count == int(left.sum())


def test_a_folder_loads_its_masks_and_skips_the_ct_and_dose(ct, synth, tmp_path):
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    _write(synth.box(ct, (-5, -5, -5), (5, 5, 5)), ct, tmp_path / "SpinalCord.nii.gz")
    dose = sitk.Cast(ct, sitk.sitkFloat32) * 0.01
    sitk.WriteImage(dose, str(tmp_path / "dose.nii.gz"))
    (tmp_path / "notes.txt").write_text("not an image")
    s = StructureSet.from_files(tmp_path, ct)
    assert s.names == ["SpinalCord"]
    skipped = {p.split("/")[-1]: why for p, why in s.skipped}
    assert set(skipped) == {"ct.nii.gz", "dose.nii.gz"}
    assert "negative values" in skipped["ct.nii.gz"]


def test_an_image_given_as_a_structure_is_refused(ct, tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(path))
    with pytest.raises(ChatError, match="ct.nii.gz.*negative values"):
        StructureSet.from_files([path], ct)


def test_label_map_names_from_a_sidecar_json(ct, synth, tmp_path):
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[synth.box(ct, (20, -10, -10), (40, 10, 10))] = 1
    labels[synth.box(ct, (-40, -10, -10), (-20, 10, 10))] = 3
    _write(labels, ct, tmp_path / "organs.nii.gz")
    (tmp_path / "organs.json").write_text(json.dumps({"1": "kidney_left", "2": "liver", "3": "kidney_right"}))
    s = StructureSet.from_files([tmp_path / "organs.nii.gz"], ct)
    assert s.names == ["kidney_left", "liver", "kidney_right"]
    assert [x.concept for x in s] == ["kidney_left", "liver", "kidney_right"]
    assert s.resolve("liver")[0].empty  # named but absent: loaded, and answers "not present"
    np.testing.assert_array_equal(s.resolve("kidney_right")[0].mask, labels == 3)
    assert [x.label for x in s] == [1, 2, 3]


@pytest.mark.parametrize("names", [
    {"spleen": 1, "liver": 2},  # name -> label
    {"labels": {"background": 0, "spleen": 1, "liver": 2}},  # nnU-Net dataset.json
    ["background", "spleen", "liver"],  # indexed by label
    {"1": {"name": "spleen"}, "2": {"name": "liver"}},
])
def test_sidecar_forms(ct, tmp_path, names):
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[5:8, 10:12, 10:12] = 1
    labels[10:12, 10:12, 10:12] = 2
    _write(labels, ct, tmp_path / "seg.nii.gz")
    (tmp_path / "seg.nii.gz.json").write_text(json.dumps(names))
    s = StructureSet.from_files([tmp_path / "seg.nii.gz"], ct)
    assert s.names == ["spleen", "liver"]


def test_label_map_without_names_gives_label_n(ct, tmp_path):
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[5:8, 10:12, 10:12] = 2
    labels[10:12, 10:12, 10:12] = 7
    _write(labels, ct, tmp_path / "seg.nii.gz")
    s = StructureSet.from_files([tmp_path / "seg.nii.gz"], ct)
    assert s.names == ["label 2", "label 7"]
    assert s.resolve("name:label 7")[0].voxel_count == 8


def _write_seg_nrrd(path, data, spacing, origin, segments):
    """A Slicer-style .seg.nrrd (data (k, j, i, layers) uint8; segments (name, value, layer))."""
    header = ["NRRD0004", "type: unsigned char", "dimension: 4", "space: left-posterior-superior",
              "sizes: {} {} {} {}".format(data.shape[3], data.shape[2], data.shape[1], data.shape[0]),
              "space directions: none ({},0,0) (0,{},0) (0,0,{})".format(*spacing),
              "kinds: list domain domain domain", "encoding: raw",
              "space origin: ({},{},{})".format(*origin)]
    for n, (name, value, layer) in enumerate(segments):
        header += [f"Segment{n}_Name:={name}", f"Segment{n}_LabelValue:={value}", f"Segment{n}_Layer:={layer}"]
    path.write_bytes(("\n".join(header) + "\n\n").encode() + np.ascontiguousarray(data, np.uint8).tobytes())


def test_slicer_seg_nrrd_layers_values_and_cropped_extent(tmp_path):
    ct = sitk.Image([20, 18, 16], sitk.sitkInt16)
    ct.SetSpacing((2.0, 2.0, 3.0))
    ct.SetOrigin((10.0, 20.0, 30.0))
    # Slicer saves the segments' extent only: here i 4..9, j 5..11, k 2..7 of the CT's grid
    crop = np.zeros((6, 7, 6, 2), np.uint8)
    crop[1, 2, 3, 0] = 1  # PTV70 at CT voxel (i, j, k) = (7, 7, 3)
    crop[2, 2, 2, 0] = 2  # Cord at (6, 7, 4)
    crop[3, 1, 1, 1] = 1  # Left Parotid, layer 1, at (5, 6, 5)
    path = tmp_path / "plan.seg.nrrd"
    _write_seg_nrrd(path, crop, (2.0, 2.0, 3.0), (10.0 + 4 * 2, 20.0 + 5 * 2, 30.0 + 2 * 3),
                    [("PTV70", 1, 0), ("Cord", 2, 0), ("Left Parotid", 1, 1)])
    s = StructureSet.from_files([path], ct)
    assert s.names == ["PTV70", "Cord", "Left Parotid"]
    assert [x.concept for x in s] == ["ptv70", "spinal_cord", "parotid_left"]
    assert [tuple(np.argwhere(x.mask)[0]) for x in s] == [(3, 7, 7), (4, 7, 6), (5, 6, 5)]  # (k, j, i)


@pytest.mark.parametrize("change, what", [
    (lambda m: m.SetSpacing((4.0, 4.0, 3.0)), "spacing"),
    (lambda m: m.SetOrigin(np.add(m.GetOrigin(), (2.0, 0, 0)).tolist()), "origin"),
    (lambda m: m.SetDirection(np.eye(3).ravel().tolist()), "direction"),
])
def test_an_off_grid_mask_is_refused_naming_the_file_and_the_fix(ct, tmp_path, change, what):
    mask = sitk.GetImageFromArray(np.ones(ct.GetSize()[::-1], np.uint8))
    mask.CopyInformation(ct)
    change(mask)
    path = tmp_path / "PTV70.nii.gz"
    sitk.WriteImage(mask, str(path))
    with pytest.raises(ChatError) as err:
        StructureSet.from_files([path], ct)
    message = str(err.value)
    assert str(path) in message and what in message and "resample" in message.lower()


def test_a_mask_of_another_size_is_refused(ct, tmp_path):
    small = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    small.SetSpacing(ct.GetSpacing())
    small.SetOrigin(ct.GetOrigin())
    small.SetDirection(ct.GetDirection())
    path = tmp_path / "Mandible.nii.gz"
    sitk.WriteImage(small, str(path))
    with pytest.raises(ChatError, match=r"Mandible.nii.gz.*size is \(10, 10, 10\)"):
        StructureSet.from_files(path, ct)
    with pytest.raises(ChatError, match="Mandible"):  # the in-memory route too
        StructureSet.from_masks({"Mandible": small}, ct)


def test_a_tiny_float32_origin_difference_is_the_same_grid(ct, tmp_path):
    mask = sitk.GetImageFromArray(np.zeros(ct.GetSize()[::-1], np.uint8))
    mask.CopyInformation(ct)
    mask.SetOrigin(np.add(ct.GetOrigin(), 1e-4).tolist())
    s = StructureSet.from_masks({"Larynx": mask}, ct)
    assert s.structures[0].empty and s.names == ["Larynx"]


def test_resolve_targets_ptvs_pairs_and_names(ct):
    names = ["PTV70", "PTV63", "PTV56", "GTV-1", "CTV_high", "LeftParotid", "RightParotid", "SpinalCord", "Bolus"]
    masks = {n: np.zeros(ct.GetSize()[::-1], bool) for n in names}
    s = StructureSet.from_masks(masks, ct)
    names_of = lambda sid: [x.name for x in s.resolve(sid)]  # noqa: E731
    assert names_of("target") == ["PTV70", "PTV63", "PTV56", "GTV-1", "CTV_high"]
    assert names_of("ptv") == ["PTV70", "PTV63", "PTV56"]
    assert names_of("ptv63") == ["PTV63"]
    assert names_of("gtv") == ["GTV-1"] and names_of("ctv") == ["CTV_high"]
    assert names_of("parotid") == ["LeftParotid", "RightParotid"]
    assert names_of("parotid_right") == ["RightParotid"]
    assert names_of("name:Bolus") == ["Bolus"] and names_of("name:bolus") == ["Bolus"]
    assert names_of("spinal_cord") == ["SpinalCord"]
    assert names_of("liver") == [] and names_of("name:Liver") == []
    assert s.id_of(s.resolve("ptv70")[0]) == "ptv70" and s.id_of(s.resolve("name:Bolus")[0]) == "name:Bolus"


def test_shared_concepts_go_by_name_and_duplicate_names_stay_apart(ct):
    empty = np.zeros(ct.GetSize()[::-1], bool)
    s = StructureSet.from_masks({"GTV-1": empty, "GTV-2": empty, "PTV": empty}, ct)
    assert [s.id_of(x) for x in s] == ["name:GTV-1", "name:GTV-2", "ptv"]
    assert len(s.resolve("gtv")) == 2
    a = StructureSet.from_masks({"Cord": empty}, ct)
    b = StructureSet(a.structures + StructureSet.from_masks({"cord": empty}, ct).structures, ct)
    assert b.names == ["Cord", "cord 2"]


def test_array_masks_must_have_the_ct_shape(ct):
    with pytest.raises(ChatError, match=r"'Cord' has shape \(3, 3, 3\)"):
        StructureSet.from_masks({"Cord": np.zeros((3, 3, 3))}, ct)


def test_body_is_the_loaded_contour_else_the_largest_tissue_region(ct, synth):
    body = body_from_image(ct)
    inside = sitk.GetArrayViewFromImage(ct) > -400
    np.testing.assert_array_equal(body, inside)  # one region here
    s = StructureSet.from_masks({"PTV70": np.zeros_like(body)}, ct)
    np.testing.assert_array_equal(s.body_mask(), body)
    own = synth.box(ct, (-20, -20, -100), (20, 20, 100))
    s = StructureSet.from_masks({"External": own}, ct)
    np.testing.assert_array_equal(s.body_mask(), own)


def test_totalsegmentator_label_map_with_its_classmap(shared_data):
    folder = shared_data / "samples" / "ts_abdomen_ct"
    ct = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    s = StructureSet.from_files([folder / "example_seg.nii.gz"], ct)
    classmap = json.loads((folder / "totalsegmentator_total_classmap.json").read_text())
    assert len(s) == len(classmap)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz")))
    spleen = s.resolve("spleen")[0]
    assert spleen.label == 1 and spleen.voxel_count == int((labels == 1).sum()) > 0
    assert [x.name for x in s.resolve("kidney")] == ["kidney_right", "kidney_left"]


def test_the_openkbp_patient_folder(shared_data):
    folder = shared_data / "openkbp" / "validation-pats" / "pt_201"
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"))
    s = StructureSet.from_files([folder], ct)
    assert {"PTV70", "LeftParotid", "RightParotid", "SpinalCord"} <= set(s.names)
    assert not any(n.startswith(("ct", "dose", "possible_dose")) for n in s.names)


def test_a_folder_classmap_names_label_maps_not_binary_masks(ct, synth, tmp_path):
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[5:8, 10:12, 10:12] = 1
    labels[10:12, 10:12, 10:12] = 2
    _write(labels, ct, tmp_path / "seg.nii.gz")
    _write(labels == 1, ct, tmp_path / "PTV70.nii.gz")
    (tmp_path / "totalsegmentator_total_classmap.json").write_text(json.dumps({"1": "spleen", "2": "liver"}))
    s = StructureSet.from_files(tmp_path, ct)
    assert s.names == ["PTV70", "spleen", "liver"]


def test_a_file_that_is_not_a_mask_format_says_what_to_give(ct, tmp_path):
    path = tmp_path / "RS.dcm"
    path.write_bytes(b"\0" * 200)
    with pytest.raises(ChatError, match="RS.dcm.*RTSTRUCT is not read yet"):
        StructureSet.from_files([path], ct)
