"""The module's state, kept in its parameter node (a vtkMRMLScriptedModuleNode) and so saved with the scene: a
reloaded scene restores the panel. Plain MRML parameters and node references (references survive the ID changes of
a scene import), written out here rather than through Slicer's parameterNodeWrapper so that the same code runs, and
is tested, against slicer-core."""

MODULE_NAME = "PRISMRT"


class PRISMRTParameters:
    """Typed access to the parameter node. String parameters (name: default):"""

    STRINGS = {
        "windowPreset": "soft-tissue",  # the CT window preset last applied (PRISMRTLib.imaging.WINDOW_PRESETS)
        "backend": "auto",  # the delineation model's backend ("auto", "prismrt", "teachers")
        "segmentName": "GTV",  # the segment the delineation writes
        "promptMode": "positive",  # the click mode last used: "positive", "negative" or "box"
    }
    # node references: name -> (MRML reference role, node class)
    NODES = {
        "inputVolume": ("InputVolume", "vtkMRMLScalarVolumeNode"),
        "outputSegmentation": ("OutputSegmentation", "vtkMRMLSegmentationNode"),
    }
    PROMPT_MODES = ("positive", "negative", "box")

    def __init__(self, node):
        object.__setattr__(self, "node", node)

    @classmethod
    def ofScene(cls, scene) -> "PRISMRTParameters":
        """The scene's parameter node of this module, made on first use (as ScriptedLoadableModuleLogic makes it: a
        singleton tagged with the module's name)."""
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node.SetAttribute("ModuleName", MODULE_NAME)
            node.SetSingletonTag(MODULE_NAME)
            node = scene.AddNode(node)
        return cls(node)

    def __getattr__(self, name):
        if name in self.STRINGS:
            value = self.node.GetParameter(name)
            return value if value else self.STRINGS[name]
        if name in self.NODES:
            role, className = self.NODES[name]
            referenced = self.node.GetNodeReference(role)
            return referenced if referenced is not None and referenced.IsA(className) else None
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in self.STRINGS:
            if name == "promptMode" and value not in self.PROMPT_MODES:
                raise ValueError(f"unknown prompt mode '{value}': one of {', '.join(self.PROMPT_MODES)}")
            self.node.SetParameter(name, str(value))
        elif name in self.NODES:
            role, className = self.NODES[name]
            if value is not None and not value.IsA(className):
                raise TypeError(f"{name} must be a {className}, not a {value.GetClassName()}")
            self.node.SetNodeReferenceID(role, value.GetID() if value is not None else None)
        else:
            raise AttributeError(f"the parameter node has no '{name}'")
