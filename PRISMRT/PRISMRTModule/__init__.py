"""The Slicer module's own code, one file per concern, so that each task (delineation, registration, chat) adds a
logic file and a section widget and touches nothing else:

- ``library``: PRISMRTLib on first use (it is heavy and may not be installed yet when Slicer loads the module);
- ``conversions``: MRML volume and segment <-> SimpleITK image, the one place where Slicer's RAS meets LPS;
- ``volumes``: the volume check and CT window presets of the Input section;
- ``dependencies``: the Python packages PRISMRTLib needs and their installer;
- ``mrml``: small scene helpers (nodes of a class, released as MRML wants);
- ``jobs``: a background runner (worker thread, progress, Cancel) whose results are applied on the GUI thread;
- ``parameters``: the module's state in its parameter node, saved with the scene;
- ``delineation``: the delineation logic and controller (MRML only, no Qt);
- ``delineationSection``: the delineation section of the panel (Qt; thin: buttons to controller calls);
- ``registration``: the registration logic and controller (MRML only): the field as a grid transform, the warped
  volume and segments, the QA table, checkerboard and Jacobian views;
- ``registrationSection``: the registration section of the panel (Qt, thin);
- ``chat``: the chat logic and controller (MRML only): the volume, the scene's segments and the current slice of the
  active view as a PRISMRTLib chat session; answers that name a slice jump a view there;
- ``chatSection``: the chat section of the panel (Qt, thin): history, question box, Cancel.

Everything but the ``*Section`` files imports only MRML, VTK and NumPy, so it runs against ``slicer-core`` (the MRML
library from PyPI, without the application), which is how ``Testing/module`` tests it.
"""
