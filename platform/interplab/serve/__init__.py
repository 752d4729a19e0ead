"""A shared model service on Ray Serve: models stay loaded on the cluster; clients run interventions
against them through the same backend protocol as a local model.

    interplab serve tiny-llama --tokens tokens.txt                       # the service (docs/serving.md)
    model = connect("http://127.0.0.1:8000", token=TOKEN).model("tiny-llama")
    model.run(prompts, capture=["resid_pre.1"], interventions=[...])     # a Backend, like load_model(...)

Modules: ``wire`` (the frame: JSON + safetensors), ``codec`` (engine values on the wire), ``limits``,
``auth`` (bearer tokens), ``batching`` (cross-request batches), ``service`` (the operations),
``deployment`` (the Ray Serve deployment; imports Ray), ``client`` and ``remote`` (the backend).
"""

from interplab.serve.client import Session, connect
from interplab.serve.errors import (
    AuthError,
    FieldError,
    LimitError,
    ServeError,
    ServiceError,
    ServiceUnavailable,
    UnknownModelError,
)
from interplab.serve.limits import BatchingConfig, ServeLimits
from interplab.serve.metrics import TokenMetric
from interplab.serve.remote import ReadOnlyModelError, RemoteModel, ServedConfig

__all__ = [
    "AuthError",
    "BatchingConfig",
    "FieldError",
    "LimitError",
    "ReadOnlyModelError",
    "RemoteModel",
    "ServeError",
    "ServeLimits",
    "ServedConfig",
    "ServiceError",
    "ServiceUnavailable",
    "Session",
    "TokenMetric",
    "UnknownModelError",
    "connect",
]
