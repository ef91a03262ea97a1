from fastcl.memory.feature_queue import FeatureQueue
from fastcl.memory.sample_table import SampleTable

__all__ = ["FeatureQueue", "SampleTable"]
