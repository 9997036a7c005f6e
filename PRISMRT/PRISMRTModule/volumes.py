"""The Input section's work: is the volume a usable CT (PRISMRTLib's check), and CT window presets."""

from .conversions import volumeNodeToImage
from .library import importPRISMRTLib


def windowPresetNames() -> list:
    """Names of PRISMRTLib's CT window presets, in its order."""
    return list(importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS)


def applyWindowPreset(volumeNode, presetName: str) -> None:
    """Show ``volumeNode`` with a fixed CT window (PRISMRTLib.imaging.WINDOW_PRESETS): auto window/level off."""
    presets = importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS
    if presetName not in presets:
        raise ValueError(f"Unknown window preset '{presetName}': choose one of {', '.join(presets)}.")
    if volumeNode is None:
        raise ValueError("No volume given: select a CT volume first.")
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        if volumeNode.GetScene() is None:
            raise ValueError(f"The volume '{volumeNode.GetName()}' is not in a scene, so it cannot be displayed.")
        volumeNode.CreateDefaultDisplayNodes()
        displayNode = volumeNode.GetDisplayNode()
    if not displayNode.IsA("vtkMRMLScalarVolumeDisplayNode") or displayNode.IsA("vtkMRMLLabelMapVolumeDisplayNode"):
        raise ValueError(f"The volume '{volumeNode.GetName()}' is a label map; window presets apply to CT volumes.")
    preset = presets[presetName]
    wasModifying = displayNode.StartModify()
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(float(preset.width), float(preset.level))
    displayNode.EndModify(wasModifying)


def checkVolume(volumeNode) -> str:
    """PRISMRTLib's human-readable summary of the volume; raises a PrismRTError saying what to do if it is unusable."""
    imaging = importPRISMRTLib("PRISMRTLib.imaging")
    return imaging.check_volume(volumeNodeToImage(volumeNode)).to_text()
