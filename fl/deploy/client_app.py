"""The deployable ClientApp: the project's ClientApp (``clients.app``) with the device mod.

``flwr run`` names ``fl.deploy.client_app:app``; every SuperNode (and every virtual node of a
``flwr run`` simulation) runs it. The handlers are the simulator's own; ``fl.deploy.device.device_mod``
only resolves the run's ``ClientSpec`` from the run config and applies the node config.
"""

from clients.app import build_client_app
from fl.deploy.device import device_mod

app = build_client_app(mods=[device_mod])
