"""Masks for masked token modelling. Convention: True (1) = masked (to generate), False (0) = kept prompt.

Every mask is a bool tensor shaped ``[batch, codebooks, frames]``; every function here is pure.
"""
