"""Build the C core of simbridge.shm; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "simbridge.shm._core",
            sources=["src/simbridge/shm/_core.c"],
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
    ]
)
