"""Mining engines: the faiss / torch engine choice and kNN semantic pairs (SePP), faiss with a torch fallback.
IFND's spherical k-means and pseudo labels live in methods/ifnd.py and use engine.py.

Run on rank 0 and broadcast (DESIGN.md "State contract"); see engine.py for how the engine is chosen.
"""
from fastcl.mining.engine import choose_engine, gpu_resources
from fastcl.mining.knn import (center_features, knn_search, pair_precision, pca_reduce, semantic_pairs,
                               threshold_for_precision)
from fastcl.mining.miner import NeighbourMiner

__all__ = ["choose_engine", "gpu_resources", "knn_search", "semantic_pairs",
           "pair_precision", "center_features", "threshold_for_precision", "pca_reduce",
           "NeighbourMiner"]
