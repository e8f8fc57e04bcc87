"""Experiment configs, one ml-collections file per experiment (`jaxpoison list`).

Installed, this folder is the package `jaxpoison.configs` (setup.py maps it), so
`jaxpoison --config NAME` finds the files from any folder.
"""
