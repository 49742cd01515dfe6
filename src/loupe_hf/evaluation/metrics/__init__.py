"""``evaluate`` metric scripts, loaded by path (see ``loupe_hf.evaluation.load_metric``).

Each sub-folder holds one script named after it; the ``__init__.py`` files only make setuptools
ship the scripts with the package.
"""
