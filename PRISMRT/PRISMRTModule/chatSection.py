"""The panel's Chat section (Qt): ``Resources/UI/PRISMRTChat.ui`` wired to a
:class:`~PRISMRTModule.chat.ChatController`. Only the application has Qt, so this file is the one part of the chat
that the slicer-core tests cannot run; it holds no logic of its own: the question box and buttons call the
controller, and the controller's history is shown (as :func:`~PRISMRTModule.chat.historyHtml`).

The slice views are observed while the module is shown, so the view last scrolled or turned is the one a question
is about (unless the mouse is over another, or the application marks one active).
"""

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .chat import ChatController, ChatParameters, historyHtml, parseLink


class ChatSection(VTKObservationMixin):
    POLL_MS = 50  # how often a finished answer is shown
    CONTEXT_DELAY_MS = 150  # the context line follows slice changes after this pause (scrolling sends many)
    CONTEXT_REFRESH_MS = 1000  # and is refreshed this often anyway (segments added, volumes loaded)

    def __init__(self, moduleWidget, parentLayout):
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget  # the module's widget: parameter node, dependencies
        self.uiWidget = slicer.util.loadUI(moduleWidget.resourcePath("UI/PRISMRTChat.ui"))
        parentLayout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)  # the .ui passes the scene on to the volume selector

        self.controller = ChatController(slicer.mrmlScene, logic=moduleWidget.logic.chat, onChanged=self.updateGUI)
        self._shownRevision = -1
        self._sliceMatrices = {}  # slice node ID -> its last SliceToRAS, to tell a scroll from other changes
        self._packagesChecked = False

        self.ui.chatVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.chatQuestionLineEdit.connect("returnPressed()", self.onAsk)
        self.ui.askButton.connect("clicked(bool)", self.onAsk)
        self.ui.cancelAskButton.connect("clicked(bool)", self.controller.cancel)
        self.ui.clearChatButton.connect("clicked(bool)", self.controller.clear)
        self.ui.chatHistoryBrowser.connect("anchorClicked(QUrl)", self.onLink)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)
        self._contextTimer = qt.QTimer()
        self._contextTimer.setSingleShot(True)
        self._contextTimer.setInterval(self.CONTEXT_DELAY_MS)
        self._contextTimer.connect("timeout()", self.updateContext)
        self._refreshTimer = qt.QTimer()
        self._refreshTimer.setInterval(self.CONTEXT_REFRESH_MS)
        self._refreshTimer.connect("timeout()", self.updateContext)
        self.updateGUI()

    # ---- parameter node <-> GUI ----------------------------------------------------------------------------------
    def _settings(self):
        parameters = self.moduleWidget.parameters
        return ChatParameters(parameters.node) if parameters is not None else None

    def _chosenVolume(self):
        settings = self._settings()
        return settings.chatVolume if settings is not None else None

    def onVolumeChanged(self, node) -> None:
        settings = self._settings()
        if settings is not None and settings.chatVolume is not node:
            settings.chatVolume = node
        self.updateContext()

    def updateGUIFromParameters(self, parameters) -> None:
        selector = self.ui.chatVolumeSelector
        wasBlocked = selector.blockSignals(True)
        selector.setCurrentNode(self._chosenVolume())
        selector.blockSignals(wasBlocked)
        self.updateContext()
        self.updateGUI()

    # ---- controller state -> GUI ---------------------------------------------------------------------------------
    def updateContext(self) -> None:
        try:
            self.ui.chatContextLabel.text = self.controller.contextText(self._chosenVolume())
        except Exception as error:  # the line is informative only: never let it break the panel
            self.ui.chatContextLabel.text = str(error)

    def updateGUI(self) -> None:
        controller = self.controller
        busy = controller.busy
        self.ui.askButton.enabled = not busy
        self.ui.askButton.toolTip = _("The previous question is being answered") if busy else \
            _("Ask the question (Enter does the same)")
        self.ui.chatProgressBar.visible = busy
        self.ui.cancelAskButton.visible = busy
        label = self.ui.chatStatusLabel
        label.text = controller.status
        label.styleSheet = "color: #c0392b;" if controller.failed else ""
        if controller.revision != self._shownRevision:  # redraw only on change: polling must not reset the scroll
            self._shownRevision = controller.revision
            self.ui.chatHistoryBrowser.setHtml(historyHtml(controller.history))
            qt.QTimer.singleShot(0, self._scrollToEnd)  # once the new text is laid out: the latest answer in view

    def _scrollToEnd(self) -> None:
        scrollBar = self.ui.chatHistoryBrowser.verticalScrollBar()
        scrollBar.value = scrollBar.maximum

    def _poll(self) -> None:
        controller = self.controller
        controller.poll()
        if controller.busy:
            _, text = controller.progress()
            self.ui.chatProgressBar.format = text or _("Answering...")
        elif not controller.waiting:
            self._pollTimer.stop()
        self.updateGUI()

    # ---- actions -------------------------------------------------------------------------------------------------
    def onAsk(self) -> None:
        question = self.ui.chatQuestionLineEdit.text.strip()
        if not question or self.controller.busy:
            return
        if not self._packagesChecked:  # once: PRISMRTLib's packages (the image model's torch is asked for later)
            if not self.moduleWidget.ensurePythonPackages():
                return
            self._packagesChecked = True
        with slicer.util.tryWithErrorDisplay(_("The question could not be asked."), waitCursor=True):
            self.controller.ask(question, volumeNode=self._chosenVolume())
            self.ui.chatQuestionLineEdit.text = ""
            self._pollTimer.start()

    def onLink(self, url) -> None:
        link = parseLink(url.toString())
        if link is None:
            return
        action, entryID, index = link
        with slicer.util.tryWithErrorDisplay(_("That could not be done."), waitCursor=True):
            if action == "slice":
                self.controller.jumpTo(entryID)
            elif not self.controller.busy:
                self.controller.chooseReading(entryID, index)
                self._pollTimer.start()
        self.updateContext()

    # ---- the slice view in use ----------------------------------------------------------------------------------
    def _observeSliceViews(self) -> None:
        for sliceNode in self.controller.logic.sliceNodes(slicer.mrmlScene):
            if not self.hasObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified):
                self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)
                self._sliceMatrices[sliceNode.GetID()] = self._matrix(sliceNode)

    @staticmethod
    def _matrix(sliceNode) -> tuple:
        m = sliceNode.GetSliceToRAS()
        return tuple(m.GetElement(r, c) for r in range(3) for c in range(4))

    def onSliceModified(self, caller, event) -> None:
        """Slice nodes change for much else (field of view, hovering labels): only a new plane marks it used."""
        matrix = self._matrix(caller)
        if self._sliceMatrices.get(caller.GetID()) != matrix:
            self._sliceMatrices[caller.GetID()] = matrix
            self.controller.logic.noteViewUsed(caller)
            self._contextTimer.start()

    def onSceneNodesChanged(self, caller, event) -> None:
        self._observeSliceViews()  # a layout with new views
        self._contextTimer.start()

    # ---- the module's life ---------------------------------------------------------------------------------------
    def enter(self) -> None:
        self._observeSliceViews()
        for event in (slicer.mrmlScene.NodeAddedEvent, slicer.mrmlScene.NodeRemovedEvent):
            if not self.hasObserver(slicer.mrmlScene, event, self.onSceneNodesChanged):
                self.addObserver(slicer.mrmlScene, event, self.onSceneNodesChanged)
        self._refreshTimer.start()
        if self.controller.busy:
            self._pollTimer.start()
        self.updateContext()
        self.updateGUI()

    def leave(self) -> None:
        """The module was left: a pending answer still comes (shown on return); views are no longer watched."""
        self._refreshTimer.stop()
        self._contextTimer.stop()
        self.removeObservers()
        self._sliceMatrices = {}

    def sceneClosed(self) -> None:
        """The history and the cached session belong to the scene; the slice views (singletons) stay observed."""
        self._pollTimer.stop()
        self.controller.forgetScene()

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self.leave()
        self.controller.leave()
