"""The one compiled part: the native engine's decode step (``aurl.engines._native``).

``optional``: where no C compiler is at hand the install goes on without it, and
``--engine native`` says so in one line (the torch and onnx engines need no compiler)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "aurl.engines._native",
            ["src/aurl/engines/_native.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-std=c11"],
            optional=True,
        )
    ]
)
