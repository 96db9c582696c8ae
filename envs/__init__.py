"""Gymnasium side of the toolkit: real ViZDoom envs, collection, and the dream envs.

``import envs`` registers the ``VideoGPTDream-<Name>-v0`` ids with Gymnasium.
"""
