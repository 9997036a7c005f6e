"""Small MRML scene helpers shared by the sections (MRML only: they run against slicer-core)."""


def nodesByClass(scene, className) -> list:
    """The scene's nodes of a class. The collection GetNodesByClass returns is the caller's to release: kept, it
    would hold every node in it (and a deleted volume's voxels) for good."""
    collection = scene.GetNodesByClass(className)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
