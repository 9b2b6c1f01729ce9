"""The simulator's core: engines, payload codecs and byte accounting, data, models, local training,
run logging and results. Nothing here imports ``strategies``, ``clients`` or ``plugins``, except the
entry points (simulate, config, execute, explain, export, deploy)."""

# Read torch's default thread count before anything in the process can change it (fl.threads).
from fl import threads as _threads  # noqa: F401
