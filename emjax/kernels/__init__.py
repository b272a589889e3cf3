"""Fused kernels: exact top-k feature-similarity search (Pallas + blocked XLA, mesh-sharded)."""

from emjax.kernels.similarity import similarity_score, similarity_topk, similarity_topk_sets

__all__ = ["similarity_score", "similarity_topk", "similarity_topk_sets"]
