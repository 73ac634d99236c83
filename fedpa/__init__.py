"""fedpa: federated personalization of recommendation models with adapters, on Flower.

The installed namespace maps the repository's rooms: ``fedpa.foundation``, ``fedpa.recdata``,
``fedpa.recmodels``, ``fedpa.common``, ``fedpa.client``, ``fedpa.server`` and ``fedpa.simulations``
(see ARCHITECTURE.md).
"""

__version__ = "0.2.0"
