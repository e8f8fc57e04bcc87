"""Packages of the wheel; the metadata is in pyproject.toml.

`configs/` stays at the top of the repository (where README and every docstring
point) and ships inside the wheel as `jaxpoison.configs` from that one copy, so an
installed `jaxpoison --config quickstart` finds it (`jaxpoison.catalog`).
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["jaxpoison", "jaxpoison.*"]),
        "jaxpoison.configs",
    ],
    package_dir={"jaxpoison.configs": "configs"},
)
