"""The offline demo (docs/demo.md), a client of the prometar_jax library.

A folder of the checkout, like configs/ and launch.py, not part of the
installed package: run it from the checkout's root.
"""
