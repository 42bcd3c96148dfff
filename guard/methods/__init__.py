"""Erasure methods: one module (or package) each, behind one small interface, listed in the registry."""
