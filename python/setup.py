"""pip install ./python: builds libgoat.so with the repository's Makefile (`make torch`: nvcc, no PyTorch headers)
and installs the goat_torch package with it. PyTorch itself is not a dependency pip should choose for you."""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BuildWithLibrary(build_py):
    def run(self):
        subprocess.check_call(["make", "-C", ROOT, "torch"])
        super().run()


class BinaryDistribution(Distribution):
    """The wheel carries libgoat.so: tag it for this platform, not as pure Python."""

    def has_ext_modules(self):
        return True


setup(
    name="goat-torch",
    version="0.1.0",
    description="GOAT attention's fused CUDA kernels for PyTorch (custom ops, autograd, a drop-in GoatAttention)",
    packages=["goat_torch"],
    package_data={"goat_torch": ["libgoat.so"]},
    cmdclass={"build_py": BuildWithLibrary},
    distclass=BinaryDistribution,
    python_requires=">=3.9",
)
