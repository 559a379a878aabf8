"""Sparsity: unstructured and N:M masks, the OBS reconstruction, and compact sparse files."""
