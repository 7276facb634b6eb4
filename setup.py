"""Build script: compiles the Cython core ``fastsend._core``.

Set FASTSEND_CYTHON_DEBUG=1 for an annotated, line-traced debug build.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTSEND_CYTHON_DEBUG") == "1"
directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "embedsignature": True,
}
macros = []
if debug:
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

ext = Extension(
    "fastsend._core",
    ["src/fastsend/_core.pyx"],
    extra_compile_args=["-O3"] if not debug else ["-O0", "-g"],
    define_macros=[*macros, ("OPENSSL_SUPPRESS_DEPRECATED", "1")],
    # libcrypto (OpenSSL, as Python's hashlib): SHA-256 for message-id MACs and
    # DKIM body hashes without Python objects (libssl-dev at build time).
    libraries=["crypto"],
)

# FASTSEND_SKIP_CORE=1: the package without the compiled core (scripts/test installs
# it so, then builds the core in place beside its static checks: one core compiles).
if os.environ.get("FASTSEND_SKIP_CORE") == "1":
    setup()
else:
    setup(ext_modules=cythonize([ext], compiler_directives=directives, annotate=debug))
