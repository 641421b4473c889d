"""Thin setup.py: metadata lives in pyproject.toml; this file only declares compiled extensions."""

from setuptools import setup


def get_extensions():
    # The Hough-voting op (deeperlab_d2/layers/csrc) is added here by the inference work.
    return []


setup(ext_modules=get_extensions())
