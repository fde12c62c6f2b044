"""Analyses that read a model and its caches: DLA, circuits, composition, head detectors."""
