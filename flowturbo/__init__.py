"""flowturbo: fast sampling of flow-based image generators (FlowTurbo, NeurIPS 2024).

The library core (``flowturbo.models``, ``flowturbo.flow``, ``flowturbo.sampling``) imports with
torch alone; training and evaluation import Lightning, Hydra and friends where they are used.
"""

__version__ = "0.1.0"
