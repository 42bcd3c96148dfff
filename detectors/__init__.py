"""Detectors: which policy concepts a text (or an image) touches, with scored evidence.

Every text detector implements :class:`detectors.base.Detector`. They depend only on the ground floor
(:mod:`guard.policy`, :mod:`guard.models`, :mod:`guard.errors`).
"""
