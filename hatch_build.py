"""Hatch build hook: a wheel without the prebuilt JupyterLab extension is refused, since pip users get no node
to build it; an editable install without it only warns (the Lab panel is missing, everything else works)."""

import os

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUILT = os.path.join("mpitasker_ext", "labextension", "package.json")


class LabExtensionHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        if os.path.isfile(os.path.join(self.root, BUILT)):
            return
        message = (f"{BUILT} is missing: build the JupyterLab extension first with `bash .ci/build-labextension` "
                   "(needs node and npm)")
        if version == "editable":
            self.app.display_warning(message + "; installing without the JupyterLab panel")
            return
        raise RuntimeError(message)
