"""Build the C core of simbridge.shm, and ship include/simbridge/shm.h inside wheels.

Everything else is in pyproject.toml. The header's one source stays include/; the copy under
simbridge/include exists only in build output, so C peers of an installed simbridge can use
`cc -I"$(simbridge shm include)"`.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class BuildPyWithHeader(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "simbridge" / "include" / "simbridge"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path("include") / "simbridge" / "shm.h", target / "shm.h")


setup(
    cmdclass={"build_py": BuildPyWithHeader},
    ext_modules=[
        Extension(
            "simbridge.shm._core",
            sources=["src/simbridge/shm/_core.c", "src/simbridge/shm/_ring.c"],
            include_dirs=["include"],
            depends=["include/simbridge/shm.h"],
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Werror=implicit-function-declaration",
            ],
        )
    ],
)
