"""Packaging beyond pyproject.toml: install ``twotower_train-lm_eval.pth`` next to the
package (site-packages), for regular and editable installs alike, so that lm-eval's own
command line knows ``--model twotower`` (see ``twotower_train/lm_eval_hook.py``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path(__file__).resolve().parent / "twotower_train-lm_eval.pth"


class BuildPyWithPth(build_py):
    """A wheel's root is site-packages: put the .pth there."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib) / PTH.name))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH.name)]


cmdclass = {"build_py": BuildPyWithPth}

try:  # editable installs (PEP 660) build their own wheel: add the .pth to its root too
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        def _install_namespaces(self, installation_dir, pth_prefix):
            super()._install_namespaces(installation_dir, pth_prefix)
            shutil.copy(PTH, Path(installation_dir) / PTH.name)

    cmdclass["editable_wheel"] = EditableWheelWithPth
except ImportError:  # an old setuptools: regular installs still get the hook
    pass

setup(cmdclass=cmdclass)
