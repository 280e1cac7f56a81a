"""Builds the optional C accelerator; everything else is declared in pyproject.toml.

The extension is optional: if it fails to compile, racer_local falls back to its
pure-Python twin (same results, slower) instead of failing the install.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "racer_local._native",
            sources=["native/ngram.c", "native/output_layer.c", "native/module.c"],
            include_dirs=["native"],
            extra_compile_args=["-O3", "-std=c99"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
