"""Real Flower deployment: the simulator's ServerApp and ClientApp behind ``flwr run``.

- ``fl.deploy.server_app:app`` and ``fl.deploy.client_app:app`` are the components named in
  ``pyproject.toml`` (``[tool.flwr.app.components]``); a SuperLink runs the first, every SuperNode
  the second.
- ``fl.deploy.run_config``: both sides compose the same Hydra config from the run config key
  ``overrides`` (the very overrides ``python -m fl.simulate`` takes), so they agree on the data,
  the model and the plugins without a second source of truth.
- ``fl.deploy.device``: settings of one device from its ``--node-config`` (partition or a local
  ImageFolder, torch threads, device profile and its DELTA tier, a per-message byte log).

The guide is ``docs/deploy.md``.
"""
