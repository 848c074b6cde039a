"""The optional C helper of the runtime controller (metadata lives in pyproject.toml).

``mpsearch.runtime._topgap`` reads top-2 logit gaps straight from a tensor's memory. It is
``optional``: without a C compiler the install goes on and the scorers use their portable
path, which gives the very same numbers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mpsearch.runtime._topgap",
            sources=["mpsearch/runtime/_topgap.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
