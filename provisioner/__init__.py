"""provisioner: reliable, isolated, cheap container test environments for DSPy programs.

The public API is re-exported here; everything else is internal.
"""

from provisioner.errors import (
    BridgeConnectionError,
    BridgeError,
    CassetteMissError,
    ConfigError,
    CostLimitExceeded,
    DockerUnavailableError,
    ImageError,
    LeakError,
    LMError,
    ProtocolError,
    ProvisionerError,
    RateLimitExceeded,
    RuntimeProblem,
    UnknownLayerError,
    UnknownModelPriceError,
    WorkerLostError,
    WorkerNotReadyError,
)
from provisioner.layers import Layer, get_layer, resolve_layers
from provisioner.lmconfig import LMConfig, MockRule, ModelPrice
from provisioner.settings import Settings, load_settings

__version__ = "0.1.0"

__all__ = [
    "BridgeConnectionError",
    "BridgeError",
    "CassetteMissError",
    "ConfigError",
    "CostLimitExceeded",
    "DockerUnavailableError",
    "ImageError",
    "LMConfig",
    "LMError",
    "Layer",
    "LeakError",
    "MockRule",
    "ModelPrice",
    "ProtocolError",
    "ProvisionerError",
    "RateLimitExceeded",
    "RuntimeProblem",
    "Settings",
    "UnknownLayerError",
    "UnknownModelPriceError",
    "WorkerLostError",
    "WorkerNotReadyError",
    "__version__",
    "get_layer",
    "load_settings",
    "resolve_layers",
]
