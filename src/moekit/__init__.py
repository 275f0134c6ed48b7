"""moekit: one PyTorch toolkit for the whole life of a sparse Mixture-of-Experts model."""

from moekit.core import MoE, MoEOutput, Routing, register_router, router_names
from moekit.default import (
                            default_dense_model,
                            default_dense_model_path,
                            default_model,
                            default_model_path,
                            default_test_split,
                            default_tokenizer,
)
from moekit.errors import MoekitError

__version__ = "0.1.0"
__all__ = ["MoE", "MoEOutput", "MoekitError", "Routing", "__version__", "default_dense_model",
           "default_dense_model_path", "default_model", "default_model_path",
           "default_test_split", "default_tokenizer", "register_router", "router_names"]
