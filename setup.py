"""Build the C core of simbridge.shm and the jobs' launch wrapper, and ship include/simbridge/shm.h.

Everything else is in pyproject.toml. The header's one source stays include/; the copy under
simbridge/include exists only in build output, so C peers of an installed simbridge can use
`cc -I"$(simbridge shm include)"`. The launch wrapper (simbridge/jobs/executors/wrapper.c) is a
small executable, not an extension: build_ext links it next to its source, in the build tree
(wheels) and, for `--inplace` and editable installs, in the source tree too.
"""

import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

WRAPPER_SOURCE = Path("src") / "simbridge" / "jobs" / "executors" / "wrapper.c"
WRAPPER_PACKAGE_PATH = Path("simbridge") / "jobs" / "executors" / "simbridge-wrapper"
WRAPPER_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]


class BuildPyWithHeader(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "simbridge" / "include" / "simbridge"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path("include") / "simbridge" / "shm.h", target / "shm.h")


class BuildExtWithWrapper(build_ext):
    """build_ext, plus the launch wrapper executable (linked statically where libc.a exists: a
    static binary starts faster, and every launch pays for the start)."""

    def run(self) -> None:
        super().run()
        built = Path(self.build_lib) / WRAPPER_PACKAGE_PATH
        if self.force or not built.exists() or built.stat().st_mtime < WRAPPER_SOURCE.stat().st_mtime:
            self._link_wrapper(built)
        if self.inplace or self.editable_mode:
            target = Path("src") / WRAPPER_PACKAGE_PATH
            self.copy_file(str(built), str(target), level=self.verbose)
            os.chmod(target, 0o755)

    def _link_wrapper(self, built: Path) -> None:
        objects = self.compiler.compile(
            [str(WRAPPER_SOURCE)], output_dir=self.build_temp, extra_postargs=WRAPPER_FLAGS
        )
        built.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.compiler.link_executable(
                objects, built.name, output_dir=str(built.parent), extra_postargs=["-static", "-s"]
            )
        except Exception:  # no static libc here: a dynamic one works the same, a bit slower to start
            self.compiler.link_executable(
                objects, built.name, output_dir=str(built.parent), extra_postargs=["-s"]
            )
        os.chmod(built, 0o755)

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        if self.inplace or self.editable_mode:
            return [*outputs, str(Path("src") / WRAPPER_PACKAGE_PATH)]
        return [*outputs, str(Path(self.build_lib) / WRAPPER_PACKAGE_PATH)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace or self.editable_mode:
            built = str(Path(self.build_lib) / WRAPPER_PACKAGE_PATH)
            mapping[built] = str(Path("src") / WRAPPER_PACKAGE_PATH)
        return mapping


setup(
    cmdclass={"build_py": BuildPyWithHeader, "build_ext": BuildExtWithWrapper},
    ext_modules=[
        Extension(
            "simbridge.shm._core",
            sources=[
                "src/simbridge/shm/_core.c",
                "src/simbridge/shm/_ring.c",
                "src/simbridge/shm/_ring_io.c",
            ],
            include_dirs=["include"],
            depends=["include/simbridge/shm.h", "src/simbridge/shm/_ring.h", "src/simbridge/shm/_sbpy.h"],
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
