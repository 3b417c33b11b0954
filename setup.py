"""The optional compiled kernels; everything else is in pyproject.toml.

``pip install -e .`` builds ``tensorfabric._native`` (src/tensorfabric/_native*.c, a second or
two) where a C compiler is present; ``optional=True`` lets an install without one finish, and
tensorfabric then runs its numpy path (``tensorfabric._compiled`` says which one runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tensorfabric._native", ["src/tensorfabric/_native.c", "src/tensorfabric/_native_sum.c",
                             "src/tensorfabric/_native_plan.c", "src/tensorfabric/_native_rx.c",
                             "src/tensorfabric/_native_mac.c"],
    depends=["src/tensorfabric/_native.h"],
    # -ffp-contract=off: a multiply and an add stay two roundings, as in the numpy path
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
    optional=True)])
