"""The study of docs/study.md: a client of the library, like demo/.

configs/study.py is its config, run.py its driver (launch.py calls it),
analysis.py its arithmetic, figures.py its PNGs (matplotlib, optional).
"""
