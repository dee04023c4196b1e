"""Build hook only (metadata and options are in setup.cfg): ships ``optimum_pot_autoload.pth`` at the root of
site-packages, in wheels and in editable installs, so ``"pot"`` checkpoints load without ``import optimum_pot``
(see optimum_pot_autoload.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "optimum_pot_autoload.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also copies the ``.pth`` file to the root of the wheel."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # `pip install -e .` (PEP 660): setuptools builds the editable wheel from the install command's
            # install_lib folder (build_lib is thrown away), so the .pth goes there.
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        self.mkpath(root)
        self.copy_file(PTH, os.path.join(root, PTH), preserve_mode=0)


setup(cmdclass={"build_py": BuildPyWithPth})
