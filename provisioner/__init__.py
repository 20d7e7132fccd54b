"""provisioner: reliable, isolated, cheap container test environments for DSPy programs.

The public API is re-exported here; everything else is internal.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from provisioner.api import Environment, environment, open_environment

__version__ = "0.1.0"

# Host-side API, imported on first use: `import provisioner` also runs inside worker containers,
# whose image carries only what the worker needs (no docker, testcontainers or polyfactory).
_LAZY = dict.fromkeys(("Environment", "environment", "open_environment"), "provisioner.api")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'provisioner' has no attribute {name!r}")


__all__ = [
    "BridgeConnectionError",
    "BridgeError",
    "CassetteMissError",
    "ConfigError",
    "CostLimitExceeded",
    "DockerUnavailableError",
    "Environment",
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
    "environment",
    "get_layer",
    "load_settings",
    "open_environment",
    "resolve_layers",
]
