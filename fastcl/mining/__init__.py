"""Miners: spherical k-means pseudo labels (IFND) and kNN semantic pairs (SePP), faiss with a torch fallback.

Run on rank 0 and broadcast (DESIGN.md "State contract"); see engine.py for how the engine is chosen.
"""
from fastcl.mining.engine import choose_engine, gpu_resources
from fastcl.mining.kmeans import KMeansResult, accept, confidence, spherical_kmeans
from fastcl.mining.knn import (center_features, knn_search, pair_precision, pca_reduce, semantic_pairs,
                               threshold_for_precision)
from fastcl.mining.miner import ClusterMiner, NeighbourMiner

__all__ = ["choose_engine", "gpu_resources", "KMeansResult", "spherical_kmeans", "knn_search", "semantic_pairs",
           "pair_precision", "center_features", "threshold_for_precision", "pca_reduce", "ClusterMiner",
           "NeighbourMiner", "accept", "confidence"]
