"""The inference server that the systemd unit runs on the GPU host.

``python -m remote_service`` reads its settings from ``ASOBA_*`` environment variables (see
:mod:`remote_service.settings`), loads the model once, and serves ``/health``, ``/status``,
``/generate``, the OpenAI-compatible ``/v1/*`` endpoints and ``/metrics``.
"""

from __future__ import annotations

__version__ = "0.1.0"
SERVICE_NAME = "asoba-inference"

__all__ = ["SERVICE_NAME", "__version__"]
